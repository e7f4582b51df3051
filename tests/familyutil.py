"""Helpers shared by the per-family tests (tests/test_families_*.py): the upstream readout, one real
forward pass with module inputs/outputs captured, and a LayerNorm's linear part with frozen σ."""
from __future__ import annotations

import torch


def upstream(m, x):
    """The readout the engine decomposes for a timm classifier: ``forward_head(…, pre_logits=True)``."""
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


def run_with_io(m, x, modules: dict) -> dict:
    """One real forward pass; each named module's first positional input (``key.in``) and output (``key.out``)."""
    seen, hooks = {}, []
    for key, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(lambda _, a, key=key: seen.__setitem__(key + ".in", a[0])))
        hooks.append(mod.register_forward_hook(lambda _, __, out, key=key: seen.__setitem__(key + ".out", out)))
    try:
        upstream(m, x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def ln_lin(norm, u, stream):
    """Linear part of a LayerNorm with σ frozen at ``stream``: γ ⊙ (u − mean u) / √(var(stream) + eps)."""
    sigma = torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return norm.weight * (u - u.mean(-1, keepdim=True)) / sigma
