"""`GET /metrics` parses as Prometheus text with every family, its type and its labels."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from teacher_server.client import TeacherClient
from teacher_server.server.memory import glibc_malloc_trim
from teacher_server.server.serve import ServerThread
from teacher_server.shared.errors import InvalidRequest
from tests.helpers import AUTH, random_images

SERVED = {"small", "wide", "pair_logits", "pair_probs"}
FAMILIES = {
    "kdserve_executions": "counter",
    "kdserve_inference_images": "counter",
    "kdserve_shared_images": "counter",
    "kdserve_padding_images": "counter",
    "kdserve_batch_size": "histogram",
    "kdserve_queue_seconds": "histogram",
    "kdserve_compute_seconds": "histogram",
    "kdserve_inference_requests": "counter",
    "kdserve_pending_images": "gauge",
}
ENSEMBLES = {"pair_logits", "pair_probs"}
MEMBER_FAMILIES = {
    "kdserve_member_seconds": "histogram",
    "kdserve_member_failures": "counter",
    "kdserve_ensemble_partial_answers": "counter",
}
"""An ensemble's own: each member's latency and failures, its answers from a quorum."""
HEAP = {"kdserve_heap_trims": "counter", "kdserve_heap_trimmed_bytes": "counter"}
PROCESS = {"process_resident_memory_bytes": "gauge", "process_cpu_seconds": "counter"}


def test_every_family_with_its_labels_for_every_served_name(server: ServerThread) -> None:
    with TeacherClient.connect(server.endpoints.grpc_url) as client:
        client.infer(random_images(3), model="pair_probs")
        with pytest.raises(InvalidRequest):
            client.infer(random_images(1), model="small", temperature=0.0)
    page = httpx.get(f"{server.endpoints.http_url}/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(page.text)}
    types = {name: family.type for name, family in families.items()}
    assert PROCESS.items() <= types.items()
    heap = HEAP if glibc_malloc_trim() is not None else {}  # the trimmer runs on glibc only
    assert {k: v for k, v in types.items() if k.startswith("kdserve_heap_")} == heap
    assert all(families[name].samples[0].value >= 0 for name in heap)
    families = {k: v for k, v in families.items() if k.startswith("kdserve_")}
    families = {k: v for k, v in families.items() if k not in HEAP}
    assert {name: family.type for name, family in families.items()} == FAMILIES | MEMBER_FAMILIES
    for name, family in families.items():
        models = {sample.labels["model"] for sample in family.samples}
        if name == "kdserve_inference_requests":  # one sample per outcome seen so far
            assert {"small", "pair_probs"} <= models <= SERVED
        elif name == "kdserve_member_failures":  # one sample per reason seen so far
            assert models <= ENSEMBLES
        elif name in MEMBER_FAMILIES:
            assert models == ENSEMBLES, name
        else:
            assert models == SERVED, name
    requests = families["kdserve_inference_requests"].samples
    assert all(set(s.labels) == {"model", "outcome"} for s in requests)
    by_label = {(s.labels["model"], s.labels["outcome"]): s.value for s in requests}
    assert by_label[("pair_probs", "ok")] >= 1 and by_label[("small", "invalid")] >= 1
    for name in ("kdserve_batch_size", "kdserve_queue_seconds", "kdserve_compute_seconds"):
        samples = families[name].samples
        buckets = [s for s in samples if s.name == f"{name}_bucket"]
        assert {s.labels["le"] for s in buckets if s.labels["model"] == "small"} >= {"+Inf"}
        assert {s.name for s in samples} == {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        for model in SERVED:
            counts = [s.value for s in buckets if s.labels["model"] == model]
            assert counts == sorted(counts), f"{name} buckets of {model} must be cumulative"
    executions = {s.labels["model"]: s.value for s in families["kdserve_executions"].samples}
    assert executions["small"] >= 1 and executions["wide"] >= 1  # pair_probs ran both members
    assert executions["pair_probs"] == 0, "an ensemble's passes are its members'"
    members = families["kdserve_member_seconds"].samples
    asked = {
        s.labels["member"]: s.value
        for s in members
        if s.name == "kdserve_member_seconds_count" and s.labels["model"] == "pair_probs"
    }
    assert asked.keys() == {"small", "wide"} and min(asked.values()) >= 1
    pending = families["kdserve_pending_images"].samples
    assert all(s.value == 0 for s in pending)


def test_the_page_needs_the_token_when_the_server_has_one(strict_server: ServerThread) -> None:
    url = f"{strict_server.endpoints.http_url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=AUTH).status_code == 200
