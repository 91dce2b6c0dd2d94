"""kdserve student worker: trains a student against a remote teacher server."""

__version__ = "0.1.0"
