"""Readout pooling over sequence positions: a static weighted sum ``Σ_n ω_n x[n]`` with ``Σ ω = 1``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pooling:
    """``kind="token"``: the token at ``index`` (CLS); ``kind="avg"``: mean of positions ``start:``."""

    kind: str
    index: int = 0
    start: int = 0

    def positions(self, n: int) -> slice:
        if self.kind == "token":
            return slice(self.index, self.index + 1)
        return slice(self.start, n)

    def weights(self, n: int, batch: int, dtype: torch.dtype, device) -> Tensor:
        """Query weights ``[B, S]`` over the pooled positions (uniform, summing to 1)."""
        pos = self.positions(n)
        s = pos.stop - pos.start
        return torch.full((batch, s), 1.0 / s, dtype=dtype, device=device)

    def pool(self, x: Tensor) -> Tensor:
        """``x [B, N, D] -> [B, D]``, a new tensor (a view would keep the whole sequence alive)."""
        if self.kind == "token":
            return x[:, self.index].clone()
        return x[:, self.start:].mean(1)

    def describe(self) -> str:
        return f"token[{self.index}]" if self.kind == "token" else f"mean[{self.start}:]"
