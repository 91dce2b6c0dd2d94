"""Render the kustomize directories of deploy/k8s and check each object against its API schema.

Offline, with no cluster: built-in kinds go through kubernetes-validate's strict schemas of
K8S_VERSION; the custom resources kdserve uses through the CRD schemas vendored in crds/.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

KUBECTL = shutil.which("kubectl")
# The Kubernetes release the manifests target: kubectl's client is 1.32 too.
K8S_VERSION = "1.32"
REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
CRD_DIR = Path(__file__).parent / "crds"

# The groups whose kinds kubernetes-validate knows: the core group, the ones named before the
# *.k8s.io convention, and that convention. Any other group is a custom resource's.
UNSUFFIXED_BUILTIN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling"})
PRESERVE_UNKNOWN = "x-kubernetes-preserve-unknown-fields"
EMBEDDED_RESOURCE = "x-kubernetes-embedded-resource"
_NAMED_SCHEMAS = ("properties", "definitions")

_STRING: dict[str, Any] = {"type": "string"}
_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": _STRING}
_TIMESTAMP: dict[str, Any] = {"type": "string", "nullable": True}
# ObjectMeta as the API server reads a custom resource's metadata (a CRD's schema only says
# `type: object` there): what a manifest may set, and what the server fills in.
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": _STRING,
        "generateName": _STRING,
        "namespace": _STRING,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": _STRING},
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": _STRING,
                    "kind": _STRING,
                    "name": _STRING,
                    "uid": _STRING,
                    "controller": {"type": "boolean"},
                    "blockOwnerDeletion": {"type": "boolean"},
                },
            },
        },
        "uid": _STRING,
        "resourceVersion": _STRING,
        "selfLink": _STRING,
        "generation": {"type": "integer"},
        "creationTimestamp": _TIMESTAMP,
        "deletionTimestamp": _TIMESTAMP,
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object", PRESERVE_UNKNOWN: True}},
    },
}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` writes, in its order.

    Without kubectl the calling test fails, or is skipped where KDSERVE_SKIP_KUBECTL=1.
    """
    if KUBECTL is None:
        reason = "kubectl is not on PATH, so the kustomize directories cannot be rendered"
        if os.environ.get("KDSERVE_SKIP_KUBECTL") == "1":
            pytest.skip(reason)
        pytest.fail(f"{reason} (set KDSERVE_SKIP_KUBECTL=1 to skip instead)")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document is not None]


def overlays() -> list[Path]:
    """deploy/k8s/base, then every deploy/k8s/overlays/NAME holding a kustomization.yaml."""
    found = (K8S_DIR / "overlays").glob("*/kustomization.yaml")
    return [K8S_DIR / "base", *sorted(path.parent for path in found)]


def validate(obj: dict[str, Any]) -> list[str]:
    """Each problem the API server would refuse OBJ for, as 'Kind/name: field.path: message'.

    A built-in kind reports its first problem only (kubernetes-validate stops there); a kind
    with no schema, built-in or vendored, is a problem too.
    """
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    label = f"{kind}/{name or '<unnamed>'}"
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{label}: <root>: apiVersion and kind must be strings, got {api_version!r}"]
    group = api_version.rpartition("/")[0]
    if group in {doc_api_version.rpartition("/")[0] for doc_api_version, _ in crd_schemas()}:
        problems = _custom_resource_problems(obj, (api_version, kind))
    elif group in UNSUFFIXED_BUILTIN_GROUPS or group.endswith(".k8s.io"):
        problems = _builtin_problems(obj)
    else:
        problems = [
            f"<root>: no schema for {kind} of {api_version}: not built into Kubernetes "
            f"and not vendored in {CRD_DIR.relative_to(REPO_ROOT)}"
        ]
    return [f"{label}: {problem}" for problem in problems]


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """The vendored CRD schemas by (apiVersion, kind), made ready for jsonschema's Draft 4."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.json")):
        document = json.loads(path.read_text())
        schemas[document["apiVersion"], document["kind"]] = _as_json_schema(
            {**document["schema"], EMBEDDED_RESOURCE: True}
        )
    return schemas


def unknown_fields(
    value: Any, schema: dict[str, Any], definitions: dict[str, Any], path: str = ""
) -> list[str]:
    """The paths of the fields of VALUE that SCHEMA does not declare: those the API server
    prunes, and refuses under strict field validation (kubectl's default).

    CRD schemas never say `additionalProperties: false`, so jsonschema alone accepts typos.
    """
    if "$ref" in schema:
        schema = definitions[schema["$ref"].removeprefix("#/definitions/")]
    found: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        values_schema = schema.get("additionalProperties")
        for key, item in value.items():
            item_path = f"{path}.{key}" if path else key
            if key in properties:
                found += unknown_fields(item, properties[key], definitions, item_path)
            elif isinstance(values_schema, dict):
                found += unknown_fields(item, values_schema, definitions, item_path)
            elif not schema.get(PRESERVE_UNKNOWN):
                found.append(item_path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema.get("items", {}), definitions, f"{path}[{index}]")
    return found


def field_path(parts: Iterable[str | int]) -> str:
    """A jsonschema error's path as one writes it in a manifest: `spec.ports[0].name`."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "<root>"


def _builtin_problems(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{field_path(error.absolute_path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"<root>: {error.message}"]
    return []


def _custom_resource_problems(obj: dict[str, Any], api_version_kind: tuple[str, str]) -> list[str]:
    schema = crd_schemas().get(api_version_kind)
    if schema is None:
        vendored = sorted(f"{kind} of {api_version}" for api_version, kind in crd_schemas())
        return [
            f"<root>: no vendored schema for {api_version_kind[1]} of "
            f"{api_version_kind[0]}; vendored: {', '.join(vendored)}"
        ]
    errors = sorted(
        jsonschema.Draft4Validator(schema).iter_errors(obj),
        key=lambda error: field_path(error.absolute_path),
    )
    problems = [f"{field_path(error.absolute_path)}: {error.message}" for error in errors]
    unknown = unknown_fields(obj, schema, schema["definitions"])
    return problems + [f"{path}: unknown field" for path in unknown]


def _as_json_schema(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as jsonschema reads it: `nullable` becomes a null type, and a
    resource's (the root's, an embedded one's) apiVersion, kind and metadata get their schemas.
    """
    if isinstance(schema, list):
        return [_as_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {
        key: value if key in ("enum", "required") else _as_json_schema(value)
        for key, value in schema.items()
        if key not in ("nullable", *_NAMED_SCHEMAS)
    }
    for key in _NAMED_SCHEMAS:  # maps of names to schemas: only their values are schemas
        if key in schema:
            converted[key] = {name: _as_json_schema(sub) for name, sub in schema[key].items()}
    if schema.get("nullable") and "type" in schema:
        converted["type"] = [schema["type"], "null"]
        if "enum" in schema:
            converted["enum"] = [*schema["enum"], None]
    if schema.get(EMBEDDED_RESOURCE):
        converted["properties"] = {
            "apiVersion": _STRING,
            "kind": _STRING,
            **converted.get("properties", {}),
            "metadata": _as_json_schema(OBJECT_META),
        }
    return converted
