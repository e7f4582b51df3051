"""Per-position readouts: models whose readout weighs every position of the last stream differently.

Hierarchical models (Swin, MaxViT) and attention-pool heads (SigLIP) do not read one pooled vector
of the residual stream: a per-position LayerNorm, a patch merging, a stride-2 shortcut or the
pool's latent query sit between each branch output and the readout. With every non-linear
statistic frozen at its real value, the map from a stream at *level* ``l`` (a resolution of the
hierarchy; one level for plain ViTs) to the readout is still linear, and of the form

    z_lin(u) = F_l( P ),   P[g] = Σ_n ω_l[g, n] · u[n]        u [N_l, D_l],  P [G_l, D_l]

``ω_l [B, G_l, N_l]`` are per-image position weights in ``G_l`` groups (merge slots for Swin, pool
heads for SigLIP, one group for mean pooling) and ``F_l`` is a fixed linear map of the groups
(centring, γ, merge reductions, value and out-projections). So every component is pooled once,
with its level's weights, and then carried by ``F_l`` — never materialising per-position terms
beyond what the model itself computed. Offsets (β, merge and shortcut biases, under ``uniform`` the
shared means) are collected separately and distributed by the convention's weights.

This is the general case of the engine's one path: a CLS token or mean pooling is one group with
static weights (the CLS indicator, ``1/N``) and ``F`` the identity, so ``engine.as_positions``
pools those units inside their hooks instead of keeping per-position outputs. Units are built from
the registered block rules (:meth:`~.blocks.BlockRule.parts`) by :func:`~.families.block_units`.

Positions are *image coordinates*: row-major over the level's grid (after undoing window and grid
partitions and the cyclic shift), prefix tokens first for ViTs. Per-position ("token") terms of a
component are its direct effects at each position of its level: they sum to the component.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .affine import NormSpec, center_last


@dataclass
class Unit:
    """One decomposable branch of a per-position model.

    ``kind``: ``"attn"`` (split into heads through ``proj``) or ``"branch"`` (one output; the
    component kind is ``ckind``: ``mlp`` or ``conv``). ``hooks(store, key)`` registers forward
    hooks that put, under ``store[key]``, the per-position tensor in image coordinates
    ``[B, N_l, C]`` — for ``attn`` the out-projection's *input* (``C = H·dh``), otherwise the branch
    output (``C = D_l``). ``gain [D_l]``: channel gain after the branch (LayerScale) or None. ``hooks`` is called as
    ``hooks(store, key, ctx)`` with the call's :class:`~.context.RuleContext`.
    """

    kind: str
    name: str
    ckind: str
    block: int
    level: int
    hooks: Callable[[dict, str], list]
    gain: Optional[Tensor] = None
    num_heads: int = 0
    head_dim: int = 0
    proj: Optional[nn.Linear] = None


@dataclass
class ReadoutMaps:
    """Frozen per-position readout of one forward pass (see the module docstring).

    ``weights[l] [B, G_l, N_l]``; ``lin(l, P [B, K, G_l, D_l]) -> [B, K, d]`` (linear, convention-
    specific centring); ``offset [B, d]``: every input-independent term (and, under ``uniform``, the
    shared norm means) that reaches the pre-``post`` readout and belongs to no unit;
    ``extra``: components living after the last stream (SigLIP's pool MLP): name → ``[B, d]``;
    ``total [B, d]``: the real pre-``post`` readout, for the diagnostics; ``post``: affine chain on
    the pooled readout (norms with frozen statistics, linear maps), as :class:`PostOp`;
    ``pool_heads [B, Hp, d]``: an attention pool's per-head outputs (a second view of the readout);
    ``pooled``: the units already pooled their terms with static weights in their hooks (CLS / mean
    readouts; ``weights`` unused, stored terms are ``[B, G, C]`` and attention units store the
    rule's :class:`~.attention.AttnResult`).
    """

    weights: dict[int, Tensor]
    lin: Callable[[int, Tensor], Tensor]
    offset: Tensor
    total: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)
    post: list = field(default_factory=list)
    pool_heads: Optional[Tensor] = None
    pooled: bool = False


@dataclass
class SpatialPlan:
    """A model whose readout is per-position (see module docstring).

    ``blocks``: (index, path, module) of every block (the unit of the ``blocks`` option);
    ``units``: ordered decomposable branches (each has its block index);
    ``embed_hook(module, store)``: hooks on a block that store its input stream ``[B, N_l, D_l]`` as
    ``store["embed"]``; ``level_of_input(block)``: level of a block's input stream;
    ``grids``: level → (h, w) after :meth:`prepare`; ``finalize(store, convention, first_level)``
    builds the :class:`ReadoutMaps`; ``extra_components``: names of post-stream components (kind, name);
    ``hooks(store)``: the plan's own hooks (statistics the readout needs); ``post``: affine maps
    applied after the family's own readout chain (``ReadoutMaps.post``), e.g. a projection a wrapper
    model adds (see :func:`~.models.with_post`); ``static``: the :class:`~.pool.Pooling` when the
    readout weights are static (a :class:`~.models.ModelPlan` seen through ``engine.as_positions``);
    ``prefix``: the readout weights are zero beyond the first ``prefix`` positions of every stream (DeiT
    distilled: the class and distillation tokens), so the engine keeps only those positions of each unit's
    output (all of them for units whose token terms are requested); None: every position counts.
    """

    family: str
    root: nn.Module
    blocks: list
    units: list[Unit]
    readout: Callable[[Tensor], Tensor]
    check_input: Callable[[Tensor], None]
    embed_hook: Callable[[nn.Module, dict], list]
    level_of_input: Callable[[int], int]
    hooks: Callable[[dict], list]
    finalize: Callable[[dict, str, int], ReadoutMaps]
    grids: Callable[[tuple[int, int]], dict[int, tuple[int, int]]]
    num_prefix_tokens: int = 0
    extra_components: list = field(default_factory=list)
    layout: str = "BND"
    post: list = field(default_factory=list)
    static: object = None
    prefix: Optional[int] = None


class PrefixStore:
    """A view of the hooks' ``store`` that keeps only the first ``n`` positions of every stored
    ``[B, N, C]`` tensor — a copy, so the model's full output can be freed (a slice would keep every
    position alive): for readouts whose weights are zero beyond them (:attr:`SpatialPlan.prefix`,
    PiT's class tokens)."""

    def __init__(self, store: dict, n: int):
        self.store, self.n = store, n

    def __setitem__(self, key, value):
        self.store[key] = value[:, :self.n].clone() if isinstance(value, Tensor) and value.dim() == 3 else value

    def __getitem__(self, key):
        return self.store[key]

    def get(self, key, default=None):
        return self.store.get(key, default)


# ------------------------------------------------------------------------------------ pure math
def pool_positions(w: Tensor, u: Tensor) -> Tensor:
    """``w [B, G, N]``, ``u [B, N, C]`` → ``[B, G, C]``."""
    return torch.einsum("bgn,bnc->bgc", w, u)


def norm_linear(spec: NormSpec, P: Tensor, convention: str) -> Tensor:
    """The linear part of a frozen norm (``1/σ`` already in the weights): ``γ ⊙ C(P)`` or ``γ ⊙ P``."""
    g = spec.weight.to(P.dtype) if spec.weight is not None else 1.0
    if spec.kind == "layernorm" and convention == "centered":
        P = center_last(P)
    return g * P


def norm_offset(spec: NormSpec, mu_over_sigma: Tensor, convention: str) -> Tensor:
    """Per-position offset of a frozen norm, ``β`` (centered) or ``β − γ μ/σ`` (uniform): ``[..., C]``."""
    C = spec.weight.shape[0] if spec.weight is not None else mu_over_sigma.shape[-1]
    dt = mu_over_sigma.dtype
    beta = spec.bias.to(dt) if spec.bias is not None else torch.zeros(C, dtype=dt, device=mu_over_sigma.device)
    if convention == "uniform" and spec.kind == "layernorm":
        g = spec.weight.to(dt) if spec.weight is not None else 1.0
        return beta - g * mu_over_sigma
    return beta.expand(*mu_over_sigma.shape[:-1], C)
