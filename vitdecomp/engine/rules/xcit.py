"""timm XCiT (``timm.models.xcit.Xcit``): cross-covariance attention blocks on the patch tokens, then
CaiT-style class-attention blocks whose ``norm2`` normalises the class-token stream itself.

Forward (timm): ``x = ConvPatchEmbed(img) + FourierPos``; ``x = XCABlock(x)`` for ``blocks.<i>`` (patch
tokens only: ``x += γ1 XCA(n1 x)``, ``x += γ3 LPI(n3 x)``, ``x += γ2 mlp(n2 x)``); then the class token is
prepended and ``cls_attn_blocks.<j>`` (``ClassAttentionBlock``) run::

    y   = n1(x);  x = x + γ1 ⊙ [attn(y)_cls, y_patches]          (ClassAttn: the class token's query only)
    x   = n2(x)                 (tokens_norm=True: every token; else the class token only)
    x   = x + [γ2 ⊙ mlp(x_cls), x_patches]

and ``z = norm(x)[:, 0]`` (``global_pool='token'``, every timm XCiT). So the class-token stream is
``s_{j+1} = u_j + γ2 ⊙ mlp(u_j)``, ``u_j = n2_j(s_j + γ1 ⊙ attn_j)``: ``n2`` is a *stream* norm. With its
per-image σ frozen it is an affine map ``γ ⊙ C(·)/σ + β`` of the whole stream, like a Swin patch merging
between two stages; here every class-attention block is a level of a per-position plan
(:class:`~.spatial.SpatialPlan`) with one position (the class token): the block's heads live at level
``j`` (before ``n2_j``), its MLP at level ``j + 1``. A term at level ``j`` reaches the readout through
``n2_j, …, n2_{L-1}`` and the final norm: readout weight ``Π 1/σ`` and linear map ``γ_f⊙C(… γ_j⊙C(·))``
(centring only under the ``centered`` convention); every ``β`` of ``n2`` is carried to ``bias`` (under
``uniform`` the offsets ``β − γμ/σ`` are shared as usual).

Components follow CaiT (:func:`~.vit_variants._register_cait`): the readout is the class token; the XCA
blocks update only patch tokens and reach it only through the class attention's keys and values, so
they have no direct effect and are not components (their effect is inside the class-attention heads;
the patch embedding, the Fourier position encoding and every XCA block fold into the keys/values, not
into ``embed``). Components: ``embed`` (the learned class token, or the class-token stream entering
the first decomposed class-attention block), ``cls_attn_blocks.<j>.attn.head.<h>`` (with γ1, through
``n2_j``), ``cls_attn_blocks.<j>.mlp`` (γ2), ``bias``. The ``blocks`` option indexes the class-attention
blocks. Token terms are per position of the class-token stream (one position), as for CaiT.

Refused (:class:`~vitdecomp.errors.UnsupportedModuleError`): ``global_pool='avg'`` (mean of the patch
tokens: the XCA blocks and the LPI convolutions would have direct effects, and every class-attention
block adds ``n1(x)`` and then the stream itself to the patch tokens), ``global_pool=''``, a model
without class-attention blocks.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .affine import NormSpec, layernorm_stats
from .blocks import BlockRule, _make
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan, norm_linear, norm_offset


def _stream_norm(path: str, mod: nn.Module) -> NormSpec:
    spec = rule_for("norm", path, mod)(mod)
    if spec.kind not in ("layernorm", "rmsnorm"):
        raise UnsupportedModuleError(f"{path}: a class-token stream norm of kind {spec.kind} is not supported for "
                                     "XCiT (LayerNorm / RMSNorm only)")
    return spec


def _register() -> None:
    from timm.models.xcit import ClassAttentionBlock, Xcit

    @register_rule("block", ClassAttentionBlock)
    def class_attention_block(path: str, module: nn.Module) -> BlockRule:
        """XCiT ``ClassAttentionBlock``: ``x_cls += γ1 ⊙ attn(n1(x))``, then ``x = n2(x)`` (the stream), then
        ``x_cls += γ2 ⊙ mlp(x_cls)``. The branches are those of CaiT's block; ``n2`` (a stream norm) is
        handled by the model plan (:func:`xcit_plan`), which puts the MLP one level after the heads."""
        _stream_norm(f"{path}.norm2", module.norm2)
        g1 = module.gamma1 if isinstance(module.gamma1, Tensor) else None      # eta=None: plain floats 1.0
        g2 = module.gamma2 if isinstance(module.gamma2, Tensor) else None
        return _make(path, module, "attn", "mlp", ("drop_path1",), ("drop_path2",), g1, g2)

    @register_rule("model", Xcit)
    def xcit_model(m: nn.Module) -> SpatialPlan:
        return xcit_plan(m)


def xcit_plan(m: nn.Module) -> SpatialPlan:
    """The per-position plan of a timm ``Xcit`` with the class-token readout (see the module docstring)."""
    from .families import block_units
    from .vit_variants import _final_position_plan

    if m.global_pool != "token":
        raise UnsupportedModuleError(
            f"Xcit global_pool={m.global_pool!r}: only the class-token readout (global_pool='token', every timm "
            "XCiT) is decomposed; with 'avg' the XCA blocks and LPI convolutions would have direct effects on "
            "the mean of the patch tokens, which vitdecomp does not decompose (build with global_pool='token')")
    seq = getattr(m, "cls_attn_blocks", None)
    if seq is None or len(seq) == 0 or getattr(m, "cls_token", None) is None:
        raise UnsupportedModuleError("cls_attn_blocks: an Xcit without class token or class-attention blocks is not "
                                     "decomposed (its class-token readout has no decomposable branch)")
    final = _stream_norm("norm", m.norm)
    rule_for("scale", "head_drop", m.head_drop)
    blocks, units, norms = [], [], []
    for j, blk in enumerate(seq):
        path = f"cls_attn_blocks.{j}"
        rule = rule_for("block", path, blk, "is not timm's xcit.ClassAttentionBlock")(path, blk)
        blocks.append((j, path, blk))
        for u in block_units(rule, j, j):
            # the heads enter the stream before n2_j (level j), the MLP after it (level j + 1)
            units.append(u if u.kind == "attn" else dataclasses.replace(u, level=j + 1))
        norms.append((blk.norm2, _stream_norm(f"{path}.norm2", blk.norm2)))
    L = len(blocks)

    def embed_hook(module, store):                        # the class-token stream entering this block
        return [module.register_forward_pre_hook(lambda _, args: store.__setitem__("embed", args[0][:, :1]))]

    def readout(x):
        return m.forward_head(m.forward_features(x), pre_logits=True)

    # the final norm's input is [class token, patches]: the readout is position 0 only (level L)
    base = _final_position_plan(m, "timm-xcit", blocks, units, final, m.norm, [0], 0, readout, lambda images: None,
                                lambda hw: (1, 1), embed_hook, stream_len=1)

    def hooks(store):
        hs = base.hooks(store)
        for j, (mod, _) in enumerate(norms):      # n2_j's input at the class token: its frozen statistics
            key = f"n2_in.{j}"
            hs.append(mod.register_forward_pre_hook(lambda _, args, key=key: store.__setitem__(key, args[0][:, :1])))
        return hs

    def finalize(store, convention, first) -> ReadoutMaps:
        top = base.finalize(store, convention, first)                  # level L: the final norm at the class token
        w_top = top.weights[0]                                         # [B, 1, 1] = 1/σ_final
        dt = w_top.dtype
        weights, stats = {L: w_top}, {}
        for j in range(L - 1, -1, -1):
            mu, sig = layernorm_stats(store[f"n2_in.{j}"].to(dt), norms[j][1])        # [B, 1, 1]
            stats[j] = (mu, sig)
            weights[j] = weights[j + 1] / sig

        def lin(level: int, P: Tensor) -> Tensor:                     # P [B, K, 1, D] at ``level`` → [B, K, d]
            for j in range(level, L):
                P = norm_linear(norms[j][1], P, convention)
            return top.lin(L, P)

        offset = top.offset
        for j in range(first, L):                  # n2_j's β (uniform: β − γμ/σ), carried from level j + 1
            mu, sig = stats[j]
            o = norm_offset(norms[j][1], mu / sig, convention)                        # [B, 1, D]
            offset = offset + lin(j + 1, (weights[j + 1] * o)[:, None])[:, 0]
        return ReadoutMaps(weights, lin, offset, top.total, post=list(top.post))

    return dataclasses.replace(base, hooks=hooks, finalize=finalize, level_of_input=lambda b: b,
                               grids=lambda hw: {lvl: (1, 1) for lvl in range(L + 1)})


_register()

__all__ = ["xcit_plan"]
