"""Regenerate the vendored CRD schemas of this folder from the upstream repositories' git history.

    python tests/deploy/crds/extract.py kserve/kserve=DIR kubeflow/training-operator=DIR \
        prometheus-operator/prometheus-operator=DIR

Each DIR is a git clone (bare or not) holding the tag named in SOURCES. The output keeps every
constraint tests/deploy/k8s.py checks and drops the rest (see README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
SOURCES = [
    {
        "repo": "kserve/kserve",
        "tag": "v0.20.0",
        "path": "config/crd/full/serving.kserve.io_inferenceservices.yaml",
    },
    {
        "repo": "kubeflow/training-operator",
        "tag": "v1.9.0",
        "path": "manifests/base/crds/kubeflow.org_pytorchjobs.yaml",
    },
    {
        "repo": "prometheus-operator/prometheus-operator",
        "tag": "v0.93.0",
        "path": "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    },
]
# Keywords the offline check ignores: documentation, merge strategy, defaulting, CEL and `format`.
IGNORED = frozenset(
    {
        "description",
        "example",
        "default",
        "format",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-validations",
    }
)
# A subtree this long (compact JSON) that occurs more than once becomes one entry of `definitions`.
SHARED_MIN_CHARS = 100


def strip(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema without the keywords the check ignores (a property may still be named so)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in IGNORED:
            continue
        if key == "properties":
            out[key] = {name: strip(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strip(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strip(sub) for sub in value]
        else:
            out[key] = value
    return out


def canonical(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def share_repeats(schema: dict[str, Any]) -> dict[str, Any]:
    """Move every repeated large subtree into `definitions`, leaving a `$ref` at each use.

    Lossless: a CRD inlines the same core type (Container, Volume, ...) dozens of times.
    """
    counts: Counter[str] = Counter()

    def count(node: Any) -> None:
        if isinstance(node, dict):
            text = canonical(node)
            counts[text] += 1
            if counts[text] > 1:
                return  # its parts were counted on its first visit
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                count(child)

    count(schema)
    names: dict[str, str] = {}
    definitions: dict[str, Any] = {}

    def replace(node: Any, name: str, *, inline: bool = False) -> Any:
        if isinstance(node, list):
            return [replace(item, name) for item in node]
        if not isinstance(node, dict):
            return node
        text = canonical(node)
        if not inline and counts[text] > 1 and len(text) >= SHARED_MIN_CHARS:
            if text not in names:
                names[text] = unique(name, definitions)
                definitions[names[text]] = replace(node, name, inline=True)
            return {"$ref": f"#/definitions/{names[text]}"}
        out = {}
        for key, value in sorted(node.items()):
            if key == "properties":
                out[key] = {prop: replace(sub, prop) for prop, sub in sorted(value.items())}
            elif key == "items":
                out[key] = replace(value, f"{name}Item")
            else:
                out[key] = replace(value, name)
        return out

    shared = replace(schema, "root", inline=True)
    return {**shared, "definitions": definitions}


def unique(name: str, taken: dict[str, Any]) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}{number}"
    return candidate


def extract(source: dict[str, str], git_dir: str) -> tuple[str, dict[str, Any]]:
    """The vendored document of one source: its file name and content."""
    git = ["git", "-C", git_dir]
    commit = subprocess.check_output([*git, "rev-parse", f"{source['tag']}^{{commit}}"], text=True)
    commit = commit.strip()
    text = subprocess.check_output([*git, "show", f"{commit}:{source['path']}"], text=True)
    crd = yaml.safe_load(text)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = strip(version["schema"]["openAPIV3Schema"])
    # Written by the controller, never by a manifest.
    schema["properties"]["status"] = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    annotations = crd["metadata"].get("annotations", {})
    document = {
        "source": {
            **source,
            "commit": commit,
            "controller-gen": annotations.get("controller-gen.kubebuilder.io/version"),
        },
        "pruned": "descriptions, defaults, formats and CEL rules dropped; status left open; "
        "repeated subtrees moved to definitions",
        "apiVersion": f"{group}/{version['name']}",
        "kind": kind,
        "schema": share_repeats(schema),
    }
    return f"{group}_{kind.lower()}_{version['name']}.pruned.json", document


def main(arguments: list[str]) -> None:
    if any(a in ("-h", "--help") for a in arguments):
        print(__doc__)
        return
    malformed = [a for a in arguments if "=" not in a]
    if malformed:
        sys.exit(f"each argument is REPO=DIR, got {malformed}")
    git_dirs = dict(argument.split("=", 1) for argument in arguments)
    missing = [source["repo"] for source in SOURCES if source["repo"] not in git_dirs]
    if missing:
        sys.exit(f"give a git directory for each of {missing} (REPO=DIR)")
    for source in SOURCES:
        name, document = extract(source, git_dirs[source["repo"]])
        text = json.dumps(document, sort_keys=True, separators=(",", ":"))
        (HERE / name).write_text(text + "\n")
        print(f"{name}: {len(text)} characters, {source['repo']}@{document['source']['commit']}")


if __name__ == "__main__":
    main(sys.argv[1:])
