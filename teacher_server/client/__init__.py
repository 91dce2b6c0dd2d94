"""The client students use: `TeacherClient.connect("grpc://host:50051", model=..., token=...)`.

`teacher_client` (the calls, endpoints and failover), `retry` (the one retry policy),
`chunking` (batches over the message limit, answers checked), `connections` (HTTP and gRPC;
what an endpoint string names is `teacher_server.shared.endpoints`),
`tls` (`ClientTls`: https:// and grpcs://, mutual TLS; no token in clear text off loopback).
"""

from teacher_server.client.chunking import TeacherReply
from teacher_server.client.retry import RetryPolicy
from teacher_server.client.teacher_client import InferOptions, TeacherClient, TopK
from teacher_server.client.tls import ClientTls
from teacher_server.shared.contract import ModelInfo

__all__ = [
    "ClientTls",
    "InferOptions",
    "ModelInfo",
    "RetryPolicy",
    "TeacherClient",
    "TeacherReply",
    "TopK",
]
