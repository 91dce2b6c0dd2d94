"""kdserve's teacher: one model or ensemble, dynamically batched, served over HTTP and gRPC.

Three parts: `shared` (the wire contract, views, architectures, weights: what both sides
use), `server` (`kdserve-teacher`) and `client` (`TeacherClient`, what students use). A
student imports `shared` and `client` only.
"""

__version__ = "0.1.0"
