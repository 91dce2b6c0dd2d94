"""Every object the kustomize directories render matches its API schema, and the check refuses
the mistakes it is there for: wrong types, misspelt fields, kinds nobody knows."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import k8s
from tests.deploy.k8s import (
    CRD_DIR,
    REPO_ROOT,
    crd_schemas,
    overlays,
    render,
    unknown_fields,
    validate,
)

OVERLAYS = overlays()


@pytest.mark.parametrize(
    "directory", OVERLAYS, ids=[path.relative_to(REPO_ROOT).as_posix() for path in OVERLAYS]
)
def test_every_rendered_object_validates(directory: Path) -> None:
    objects = render(directory)
    assert objects, f"{directory} renders no object"
    problems = [problem for obj in objects for problem in validate(obj)]
    assert not problems, "\n".join(problems)


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx"}]},
            },
        },
    }


def service_monitor() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "teacher", "labels": {"app": "teacher"}},
        "spec": {
            "selector": {"matchLabels": {"app": "teacher"}},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def inference_service() -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "teacher"},
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "kdserve:gpu",
                        "ports": [{"containerPort": 8000, "protocol": "TCP"}],
                        "resources": {"limits": {"nvidia.com/gpu": 1}},
                    }
                ],
            }
        },
    }


def pytorch_job() -> dict[str, Any]:
    replica = {
        "replicas": 2,
        "restartPolicy": "OnFailure",
        "template": {
            "metadata": {"labels": {"app": "student"}},
            "spec": {"containers": [{"name": "pytorch", "image": "kdserve:gpu"}]},
        },
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "students"},
        "spec": {"pytorchReplicaSpecs": {"Master": {**replica, "replicas": 1}, "Worker": replica}},
    }


@pytest.mark.parametrize("make", [deployment, service_monitor, inference_service, pytorch_job])
def test_the_examples_the_mistakes_start_from_are_valid(make: Callable[[], dict[str, Any]]) -> None:
    assert validate(make()) == []


def replicas_as_a_string(obj: dict[str, Any]) -> None:
    obj["spec"]["replicas"] = "3"


def containers_misspelt(obj: dict[str, Any]) -> None:
    pod = obj["spec"]["template"]["spec"]
    pod["containrs"] = pod.pop("containers")


def an_extra_misspelt_containers(obj: dict[str, Any]) -> None:
    pod = obj["spec"]["template"]["spec"]
    pod["containrs"] = pod["containers"]


def interval_misspelt(obj: dict[str, Any]) -> None:
    obj["spec"]["endpoints"][0]["intervall"] = "15s"


def labels_misspelt(obj: dict[str, Any]) -> None:
    obj["metadata"]["lables"] = obj["metadata"].pop("labels")


def predictor_misspelt(obj: dict[str, Any]) -> None:
    obj["spec"]["predictr"] = obj["spec"].pop("predictor")


def container_image_misspelt(obj: dict[str, Any]) -> None:
    obj["spec"]["predictor"]["containers"][0]["imagee"] = "kdserve:cpu"


def worker_replicas_as_a_string(obj: dict[str, Any]) -> None:
    obj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "2"


def deadline_as_a_duration(obj: dict[str, Any]) -> None:
    obj["spec"]["runPolicy"] = {"activeDeadlineSeconds": "1h"}


MISTAKES = [
    (deployment, replicas_as_a_string, "Deployment/web: spec.replicas: '3' is not of type"),
    (
        deployment,
        containers_misspelt,
        "Deployment/web: spec.template.spec: 'containers' is a required property",
    ),
    (
        deployment,
        an_extra_misspelt_containers,
        "Deployment/web: spec.template.spec: Additional properties are not allowed "
        "('containrs' was unexpected)",
    ),
    (
        service_monitor,
        interval_misspelt,
        "ServiceMonitor/teacher: spec.endpoints[0].intervall: unknown field",
    ),
    (service_monitor, labels_misspelt, "ServiceMonitor/teacher: metadata.lables: unknown field"),
    (
        inference_service,
        predictor_misspelt,
        "InferenceService/teacher: spec.predictr: unknown field",
    ),
    (
        inference_service,
        container_image_misspelt,
        "InferenceService/teacher: spec.predictor.containers[0].imagee: unknown field",
    ),
    (
        pytorch_job,
        worker_replicas_as_a_string,
        "PyTorchJob/students: spec.pytorchReplicaSpecs.Worker.replicas: '2' is not of type",
    ),
    (
        pytorch_job,
        deadline_as_a_duration,
        "PyTorchJob/students: spec.runPolicy.activeDeadlineSeconds: '1h' is not of type",
    ),
]


@pytest.mark.parametrize(
    ("make", "mistake", "expected"), MISTAKES, ids=[mistake.__name__ for _, mistake, _ in MISTAKES]
)
def test_a_mistake_is_reported_with_its_object_and_path(
    make: Callable[[], dict[str, Any]], mistake: Callable[[dict[str, Any]], None], expected: str
) -> None:
    obj = make()
    mistake(obj)
    problems = validate(obj)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_kind_without_a_schema_is_an_error() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert validate(widget) == [
        "Widget/w: <root>: no schema for Widget of example.com/v1: not built into Kubernetes "
        "and not vendored in tests/deploy/crds"
    ]


def test_an_unvendored_kind_of_a_vendored_group_is_an_error() -> None:
    runtime = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime"}
    (problem,) = validate(runtime)
    assert problem.startswith("ServingRuntime/<unnamed>: <root>: no vendored schema"), problem


def test_an_open_object_still_checks_the_fields_it_declares() -> None:
    """As the API server prunes: preserve-unknown-fields keeps unknown keys, not misspelt
    ones below a declared key; a map checks each value; an object without properties or a
    map declares nothing."""
    schema = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "known": {"type": "object", "properties": {"size": {"type": "integer"}}},
            "byName": {"$ref": "#/definitions/byName"},
            "empty": {"type": "object"},
        },
    }
    definitions = {
        "byName": {"type": "object", "additionalProperties": {"properties": {"size": {}}}}
    }
    value = {
        "anything": {"goes": 1},
        "known": {"size": 1, "sise": 2},
        "byName": {"a": {"size": 1}, "b": {"sise": 1}},
        "empty": {"key": 1},
    }
    expected = ["known.sise", "byName.b.sise", "empty.key"]
    assert unknown_fields(value, schema, definitions) == expected


def test_the_vendored_schemas_are_the_three_custom_resources_kdserve_uses() -> None:
    assert set(crd_schemas()) == {
        ("serving.kserve.io/v1beta1", "InferenceService"),
        ("kubeflow.org/v1", "PyTorchJob"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    }


@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.json")), ids=lambda path: path.name)
def test_a_vendored_schema_names_its_source_and_stays_small(path: Path) -> None:
    assert path.stat().st_size < 60_000
    source = json.loads(path.read_text())["source"]
    assert {"repo", "path", "commit", "tag"} <= source.keys(), source
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", source["repo"]), source
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), source
    assert source["path"].endswith(".yaml"), source


def test_without_kubectl_render_fails_unless_told_to_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(k8s, "KUBECTL", None)
    monkeypatch.delenv("KDSERVE_SKIP_KUBECTL", raising=False)
    with pytest.raises(pytest.fail.Exception, match="kubectl is not on PATH"):
        render(OVERLAYS[0])
    monkeypatch.setenv("KDSERVE_SKIP_KUBECTL", "1")
    with pytest.raises(pytest.skip.Exception, match="kubectl is not on PATH"):
        render(OVERLAYS[0])


def test_validate_leaves_the_object_as_it_was() -> None:
    obj = inference_service()
    before = copy.deepcopy(obj)
    validate(obj)
    assert obj == before
