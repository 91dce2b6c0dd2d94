"""`grpc_max_connection_age_s`: a gRPC connection that old is closed by the server (GOAWAY),
so a client of a `dns:///` name connects again and resolves the name again; 0 never does."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from tests.helpers import running_server, teacher_config

AGE_S = 0.5


@pytest.mark.parametrize("age_s", [AGE_S, 0])
def test_a_connection_is_closed_at_its_age(teachers: dict[str, Any], age_s: float) -> None:
    config = teacher_config(teachers, grpc_max_connection_age_s=age_s, request_timeout_s=1)
    with running_server(config) as server:
        states: list[grpc.ChannelConnectivity] = []
        channel = grpc.insecure_channel(f"127.0.0.1:{server.endpoints.grpc_port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            channel.subscribe(states.append)
            # the age, its +10% jitter, and the grace (request_timeout_s + 1 s) for requests
            # in flight, of which there are none: GOAWAY comes at the age
            time.sleep(AGE_S * 1.1 + 1.5)
            closed = grpc.ChannelConnectivity.IDLE in states
        finally:
            channel.close()
    assert closed == (age_s > 0), states
