"""Component names (README “Components and names”): the model's own module paths plus a suffix.

- ``embed``: residual stream entering the first decomposed block;
- ``<attn path>.head.<h>``: one attention head; ``<attn path>`` when heads are not split;
- ``<mlp path>``: an MLP branch;
- ``bias``: input-independent terms that belong to no branch.

Paths are relative to the vision tower (``model.visual`` for open_clip).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

EMBED = "embed"
BIAS = "bias"

KINDS = ("embed", "head", "attn", "mlp", "conv", "attn_pool", "branch", "bias")

_KIND_BY_SUFFIX = {"attn": "attn", "mlp": "mlp", "conv": "conv", "attn_pool": "attn_pool"}
_HEAD_RE = re.compile(r"^(?P<path>.+)\.head\.(?P<head>\d+)$")
_BLOCK_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Component:
    """One additive component of the readout.

    ``block`` is the index of the decomposed block in model order (0-based over *all* blocks of
    the model, not only decomposed ones); ``None`` for ``embed`` and ``bias``.
    """

    name: str
    kind: str
    path: str
    block: Optional[int] = None
    head: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Component":
        return cls(**d)


def head_name(attn_path: str, head: int) -> str:
    return f"{attn_path}.head.{head}"


def parse(name: str, block: Optional[int] = None) -> Component:
    """Parse a component name into its structured fields.

    ``block`` is filled from the caller when known; otherwise it is read from the last integer path
    segment before the suffix (``blocks.11.attn.head.3`` → 11, ``layers.2.blocks.14.mlp`` → 14).
    """
    if name == EMBED:
        return Component(EMBED, "embed", "")
    if name == BIAS:
        return Component(BIAS, "bias", "")
    m = _HEAD_RE.match(name)
    if m:
        path, head, kind = m["path"], int(m["head"]), "head"
    else:
        path, head = name, None
        kind = _KIND_BY_SUFFIX.get(name.rsplit(".", 1)[-1], "branch")
    if block is None:
        nums = _BLOCK_RE.findall(path)
        block = int(nums[-1]) if nums else None
    return Component(name, kind, path, block, head)


def select(names: Iterable[str], wanted: Iterable[str]) -> list[int]:
    """Indices of ``wanted`` in ``names``; unknown names raise with close matches."""
    from ..errors import InputError
    import difflib

    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for w in wanted:
        if w not in index:
            close = difflib.get_close_matches(w, names, n=3)
            raise InputError(f"unknown component {w!r}; close matches: {close or 'none'} "
                             f"(the model has {len(names)} components, e.g. {names[:3]})")
        out.append(index[w])
    return out
