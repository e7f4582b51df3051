"""The rule context: what the engine hands to a rule's hooks while the model runs.

A rule never sees the engine itself. Its ``hooks(ctx, sink)`` (attention rules) or
``position_hooks(ctx, sink)`` (per-position readouts) get a :class:`RuleContext` and must only read
the fields and call the methods documented here; everything else in the engine may change.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .pool import Pooling


@dataclass
class RuleContext:
    """What rules may read and call while the model runs (one context per :func:`decompose` call).

    Fields:

    - ``pooling``: the readout's static position weighting (:class:`~.pool.Pooling`: CLS token or
      mean of positions), or ``None`` for per-position readouts (SigLIP pool, per-token norm, Swin,
      MaxViT), where the weights are only known after the forward pass and rules report
      per-position tensors instead;
    - ``dtype``: the compute dtype (float64 for a float64 model, else float32); convert captured
      tensors with ``.to(ctx.dtype)`` inside :meth:`exact`;
    - ``heads``: whether attention is split into heads (``False``: report only ``AttnResult.branch``);
    - ``layout``: ``"BND"`` or ``"NBD"`` (sequence-first blocks, old open_clip);
    - ``wanted_tokens``: attention path → head indices whose per-token terms were requested.

    Methods: :meth:`token_heads`, :meth:`to_bnd`, :meth:`exact`.
    """

    pooling: Optional[Pooling]
    dtype: torch.dtype
    heads: bool
    layout: str = "BND"
    wanted_tokens: dict[str, list[int]] = field(default_factory=dict)

    def token_heads(self, attn_path: str) -> list[int]:
        """Head indices of ``attn_path`` whose per-source-token terms the caller asked for."""
        return self.wanted_tokens.get(attn_path, [])

    def to_bnd(self, x: Tensor) -> Tensor:
        """A block-level tensor in ``[B, N, D]`` order, whatever the model's sequence layout."""
        return x if self.layout == "BND" else x.transpose(0, 1)

    def exact(self):
        """Context manager: engine math runs outside autocast, in the compute dtype."""
        return torch.autocast(device_type="cuda", enabled=False) if torch.is_autocast_enabled("cuda") \
            else (torch.autocast(device_type="cpu", enabled=False) if torch.is_autocast_enabled("cpu")
                  else contextlib.nullcontext())
