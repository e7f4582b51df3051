"""Frozen affine maps and the rules that turn norm / scale modules into them.

Everything here is pure tensor math. A *stack* is a tensor ``[B, K, D]`` (or ``[B, T, D]`` for token
terms) of additive contributions whose sum over ``K`` is a pooled residual stream ``[B, D]``.

A frozen affine map is ``y = A(x) + o`` with ``A`` linear (non-linear statistics such as the
LayerNorm ``σ`` are evaluated on the real forward pass and frozen) and ``o`` an offset ``[B, D']``.
Applied to a stack, ``A`` acts on every element and ``o`` is distributed by *offset weights*
``w [K]`` with ``Σ w = 1``:

- ``centered`` convention (default): each component is centred separately inside ``A``; the
  offset (``β``, biases) goes wholly to the ``bias`` component;
- ``uniform`` convention: ``A`` does not centre; the offset, which then contains ``-γ⊙μ/σ``,
  is shared with fixed weights ``f_k`` (README “How it works, and what it costs”).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .registry import register_rule

CONVENTIONS = ("centered", "uniform")


@dataclass(frozen=True)
class NormSpec:
    """A normalisation layer over the last dim: ``kind`` is ``layernorm``, ``rmsnorm`` or ``identity``."""

    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 0.0


@dataclass(frozen=True)
class FrozenAffine:
    """``y = linear(x) + offset``; ``linear`` maps ``[B, *, D] -> [B, *, D']``, ``offset`` is ``[B, D']``."""

    linear: Callable[[Tensor], Tensor]
    offset: Optional[Tensor]


# ----------------------------------------------------------------------------------- norm rules
def _layernorm(m) -> NormSpec:
    return NormSpec("layernorm", m.weight, m.bias, float(m.eps))


def _rmsnorm(m) -> NormSpec:
    eps = m.eps if m.eps is not None else torch.finfo(m.weight.dtype if m.weight is not None else torch.float32).eps
    return NormSpec("rmsnorm", getattr(m, "weight", None), None, float(eps))


def _identity(m) -> NormSpec:
    return NormSpec("identity")


def _register_norms() -> None:
    import timm.layers.norm as tn
    from open_clip import transformer as oct

    register_rule("norm", nn.LayerNorm, tn.LayerNorm, tn.LayerNormFp32, oct.LayerNorm, oct.LayerNormFp32)(_layernorm)
    register_rule("norm", nn.RMSNorm, tn.RmsNorm, tn.RmsNormFp32)(_rmsnorm)
    register_rule("norm", nn.Identity)(_identity)


# ---------------------------------------------------------------------------------- scale rules
# Post-branch channel maps (LayerScale, DropPath/Dropout in eval): a per-channel gain or None.
def _no_scale(m) -> Optional[Tensor]:
    return None


def _gamma(m) -> Optional[Tensor]:
    return m.gamma


def _register_scales() -> None:
    from timm.layers import DropPath, LayerScale as TimmLayerScale
    from open_clip.transformer import LayerScale as OcLayerScale

    register_rule("scale", nn.Identity, nn.Dropout, DropPath)(_no_scale)
    register_rule("scale", TimmLayerScale, OcLayerScale)(_gamma)


_register_norms()
_register_scales()


# ------------------------------------------------------------------------------------ pure math
def layernorm_stats(x: Tensor, spec: NormSpec) -> tuple[Tensor, Tensor]:
    """Frozen statistics of ``x [..., D]``: mean ``[..., 1]`` (0 for RMSNorm) and ``σ [..., 1]``.

    Population variance and the module's own eps: exactly what the forward pass used. Used for
    pooled totals (``[B, D]``) and per-position streams (``[B, N, D]``) alike.
    """
    if spec.kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return mu, (var + spec.eps).sqrt()
    if spec.kind == "rmsnorm":
        return torch.zeros_like(x[..., :1]), (x.pow(2).mean(-1, keepdim=True) + spec.eps).sqrt()
    raise UnsupportedModuleError(f"no frozen statistics for a norm of kind {spec.kind!r} "
                                 "(layernorm and rmsnorm only)")


def norm_map(spec: NormSpec, total: Tensor, convention: str) -> tuple[FrozenAffine, Tensor]:
    """The frozen affine map of a norm evaluated at ``total [B, D]``, and the normed total."""
    if spec.kind == "identity":
        return FrozenAffine(lambda s: s, None), total
    mu, sigma = layernorm_stats(total, spec)          # [B, 1]
    gamma = spec.weight if spec.weight is not None else torch.ones_like(total[0])
    gamma = gamma.to(total.dtype)
    beta = spec.bias.to(total.dtype) if spec.bias is not None else torch.zeros_like(total[0])
    inv = 1.0 / sigma                                  # [B, 1]
    offset = beta.expand_as(total)
    if spec.kind == "layernorm" and convention == "centered":
        def linear(s: Tensor) -> Tensor:
            return gamma * (s - s.mean(-1, keepdim=True)) * _bcast(inv, s)
    else:
        def linear(s: Tensor) -> Tensor:
            return gamma * s * _bcast(inv, s)
        if spec.kind == "layernorm":                   # uniform: the shared mean is an offset
            offset = offset - gamma * mu * inv
    out = linear(total) + offset
    return FrozenAffine(linear, offset), out


def matrix_map(weight: Tensor, bias: Optional[Tensor], total: Tensor) -> tuple[FrozenAffine, Tensor]:
    """``y = x @ weight.T + bias`` (``weight [D', D]``), as a frozen map at ``total [B, D]``."""
    w = weight.to(total.dtype)

    def linear(s: Tensor) -> Tensor:
        return s @ w.T

    offset = bias.to(total.dtype).expand(total.shape[0], -1) if bias is not None else None
    out = linear(total) + (offset if offset is not None else 0)
    return FrozenAffine(linear, offset), out


def _bcast(per_image: Tensor, s: Tensor) -> Tensor:
    """Reshape a per-image ``[B, 1]`` factor to broadcast against ``s [B, *, D]``."""
    return per_image.reshape(per_image.shape[0], *([1] * (s.dim() - 1)))


def apply_map(m: FrozenAffine, stack: Tensor, offset_weights: Tensor) -> Tensor:
    """Apply ``m`` to ``stack [B, K, D]``; the offset goes to the components by ``offset_weights [K]``."""
    out = m.linear(stack)
    if m.offset is not None:
        out = out + offset_weights.to(out.dtype)[None, :, None] * m.offset[:, None, :]
    return out


def center_last(x: Tensor) -> Tensor:
    """``x`` minus its mean over the last (channel) dim: the centring of a LayerNorm."""
    return x - x.mean(-1, keepdim=True)


@dataclass(frozen=True)
class PostOp:
    """One affine map of the readout chain: a norm (``spec``) or ``x @ weight.T + bias``."""

    path: str
    spec: Optional[NormSpec] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
