"""`grpc_max_connection_age_s`: a gRPC connection that old is closed by the server (GOAWAY),
so a client of a `dns:///` name connects again and resolves the name again; 0 never does."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from tests.helpers import running_server, teacher_config, wait_until

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
            if age_s:
                # at the age (+-10% jitter) the server sends GOAWAY; the grace for requests in
                # flight (request_timeout_s + 1 s) is not needed, there are none
                wait_until(lambda: grpc.ChannelConnectivity.IDLE in states, "GOAWAY", timeout_s=10)
            else:
                time.sleep(AGE_S * 1.1 + 1.5)  # as long as the aged connection took, at most
                assert grpc.ChannelConnectivity.IDLE not in states, states
        finally:
            channel.close()
