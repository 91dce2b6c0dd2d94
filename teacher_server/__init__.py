"""kdserve teacher server: one model or ensemble, dynamically batched, served over HTTP and gRPC."""

__version__ = "0.1.0"
