"""The store's manifest: what was decomposed and how."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

from ..engine.names import Component
from .schema import column_for

MANIFEST = "manifest.json"
# manifest fields that must agree before appending to an existing store
IDENTITY_FIELDS = ("format", "model", "teacher", "preprocess", "teacher_preprocess", "options", "components", "dtype",
                   "passthrough")


def components_to_json(components: Sequence[Component]) -> list[dict]:
    return [{"name": c.name, "column": column_for(c.name), "kind": c.kind, "path": c.path, "block": c.block,
             "head": c.head} for c in components]


def components_from_json(items: Sequence[dict]) -> list[Component]:
    return [Component(i["name"], i["kind"], i["path"], i["block"], i["head"]) for i in items]


def manifest_diff(a: dict, b: dict) -> list[str]:
    """Identity fields on which two manifests disagree."""
    return [k for k in IDENTITY_FIELDS if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def manifest_hash(manifest: dict) -> str:
    """SHA-256 of a manifest's identity fields (what an aligner or probe was fitted on)."""
    ident = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
