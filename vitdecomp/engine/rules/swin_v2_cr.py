"""Swin Transformer V2-CR (timm ``SwinTransformerV2Cr``, ``swinv2_cr_*``): the Swin per-position plan with
V2-CR's post-norm blocks and extra main-branch norms.

Upstream (``timm/models/swin_transformer_v2_cr.py``): ``patch_embed`` (conv + LayerNorm, NCHW out); each
stage ``stages.s`` turns the stream NHWC, applies its ``downsample`` (stages ``s > 0``) and its blocks, and
turns it NCHW again; the head mean-pools the NCHW map (``forward_head(..., pre_logits=True)``). There is no
model-level final norm: the last block of the last stage always has ``norm3``.

- Block ``SwinTransformerV2CrBlock``, post-norm: ``x + dp1(n1(attn(windows(shift(x)))))`` then
  ``x + dp2(n2(mlp(x)))`` — exactly Swin V2's block (:func:`~.swin_v2.swinv2_block`: ``norm1``'s per-position
  σ frozen inside the heads, each head carrying ``γ1⊙C(b_O)/H``, ``β1`` to ``bias``; the MLP component is
  ``norm2``'s output), then ``x = norm3(x)``.
- ``norm3`` (``extra_norm``: every ``extra_norm_period`` blocks, at each stage end with ``extra_norm_stage``
  (``_ns`` models), always at the last block) *replaces* the stream: with its per-position σ frozen it is an
  affine map ``γ3 ⊙ C(x)/σ3 + β3`` that every earlier component on the stream passes through. Each ``norm3``
  therefore starts a new *level* of the plan (same grid, weights ``1/σ3`` per position, map ``γ3 ⊙ C``,
  offset ``β3`` — or ``β3 − γ3 μ/σ3`` under ``uniform``), exactly like a patch merging starts one. Levels are
  the stream segments between transitions (merges and ``norm3``s), not the stages.
- Attention ``WindowMultiHeadAttention``: scaled cosine attention, a meta-network (MLP) position bias and
  the shift mask change only the attention probabilities; heads meet only in ``proj``.
- Merge ``PatchMerging`` (V2-CR): ``reduction(norm(concat of 2×2 neighbours))`` — Swin V1's order
  (:class:`~.families.PatchMergeRule`), not Swin V2's.
- Readout: the head's mean pool of the last stream (``z = mean_n x_L[n]``, ``x_L`` after the last ``norm3``).

Token terms (per image position, in image coordinates: windows reversed, cyclic shift undone) are exact for
every head, as for Swin.
"""
from __future__ import annotations

from torch import Tensor, nn
import torch

from ...errors import InputError, UnsupportedModuleError
from .affine import NormSpec, layernorm_stats
from .families import (PatchMergeRule, _linear, _ln, _merge_weights, _nhwc_seq, _store_input, _store_output,
                       block_units)
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan, norm_linear, norm_offset
from .swin_v2 import swinv2_block
from .vit_variants import ProjInputAttention


def swinv2_cr_block(path: str, blk: nn.Module):
    """timm ``SwinTransformerV2CrBlock``'s two post-norm branches (:func:`~.swin_v2.swinv2_block`).

    Its ``norm3`` is not a branch: :func:`swinv2_cr_plan` makes it a level transition of the stream."""
    return swinv2_block(path, blk)


def _stream_norm(path: str, mod: nn.Module) -> NormSpec | None:
    """``norm3`` → its spec, or None when it is an identity."""
    if isinstance(mod, nn.Identity):
        return None
    spec = _ln(path, mod)
    return None if spec.kind == "identity" else spec


def swinv2_cr_plan(m: nn.Module) -> SpatialPlan:
    """timm ``SwinTransformerV2Cr`` as a per-position plan (see the module docstring).

    Level ``l`` is the stream after ``l`` transitions; transition ``l`` (reaching level ``l``) is a patch
    merging (``("merge", rule)``: 4 weight groups per group, :func:`~.families._merge_weights`) or a stream
    norm (``("norm", spec)``: same grid and groups, weights times ``1/σ3`` of each position).
    """
    head = m.head
    gp = getattr(head, "global_pool", None)
    if getattr(gp, "pool_type", None) != "avg" or not isinstance(getattr(head, "flatten", nn.Identity()), nn.Identity):
        raise UnsupportedModuleError(f"head.global_pool: {type(gp).__qualname__} with pool_type "
                                     f"{getattr(gp, 'pool_type', None)!r} is not decomposed; only mean pooling "
                                     "('avg') is a linear readout for Swin V2-CR (build it with global_pool='avg')")
    blocks, units, level_in = [], [], []
    trans: dict[int, tuple] = {}                 # level reached → ("merge", PatchMergeRule) | ("norm", spec, module)
    level = 0
    for s, stage in enumerate(m.stages):
        ds = stage.downsample
        if not isinstance(ds, nn.Identity):
            dpath = f"stages.{s}.downsample"
            mr = rule_for("merge", dpath, ds, "is not timm's Swin V2-CR PatchMerging")(dpath, ds)
            level += 1
            trans[level] = ("merge", mr)
        for j, blk in enumerate(stage.blocks):
            path = f"stages.{s}.blocks.{j}"
            rule = rule_for("block", path, blk, "is not timm's SwinTransformerV2CrBlock")(path, blk)
            i = len(blocks)
            blocks.append((i, path, blk))
            level_in.append(level)
            units += block_units(rule, i, level)
            n3 = getattr(blk, "norm3", None)
            if n3 is None:
                continue
            spec = _stream_norm(f"{path}.norm3", n3)
            if spec is not None:
                level += 1
                trans[level] = ("norm", spec, n3)
    L = level
    if not blocks:
        raise UnsupportedModuleError("stages: a Swin V2-CR without blocks is not decomposed")

    def hooks(store):
        hs = [m.stages[-1].register_forward_hook(_store_output(store, "final_hw", lambda t: tuple(t.shape[2:]))),
              head.register_forward_hook(_store_output(store, "z"))]
        for lvl, t in trans.items():
            if t[0] == "merge":
                mr = t[1]
                hs.append(mr.norm.register_forward_pre_hook(_store_input(store, f"merge_in.{lvl}")))
                hs.append(mr.module.register_forward_pre_hook(
                    _store_input(store, f"merge_src.{lvl}", lambda x: tuple(x.shape[1:3]))))
            else:
                hs.append(t[2].register_forward_pre_hook(_store_input(store, f"norm_in.{lvl}")))
        return hs

    def finalize(store, convention, first) -> ReadoutMaps:
        total = store["z"]
        dt = torch.float64 if total.dtype == torch.float64 else torch.float32
        dev = total.device
        B = total.shape[0]
        grid = {L: store["final_hw"]}
        n = grid[L][0] * grid[L][1]
        weights = {L: torch.full((B, 1, n), 1.0 / n, dtype=dt, device=dev)}       # the head's mean pool
        stats = {}
        for lvl in range(L, first, -1):
            t = trans[lvl]
            if t[0] == "merge":
                xm = _nhwc_seq(store[f"merge_in.{lvl}"].to(dt))                     # [B, N', 4C]
                mu, sig = layernorm_stats(xm, t[1].spec)
                grid[lvl - 1] = store[f"merge_src.{lvl}"]
                weights[lvl - 1] = _merge_weights(weights[lvl], 1.0 / sig[..., 0], grid[lvl - 1], grid[lvl])
            else:
                xn = store[f"norm_in.{lvl}"].to(dt)
                xn = xn.reshape(xn.shape[0], -1, xn.shape[-1])                      # [B, N, C]
                mu, sig = layernorm_stats(xn, t[1])
                grid[lvl - 1] = grid[lvl]
                weights[lvl - 1] = weights[lvl] / sig[..., 0][:, None]
            stats[lvl] = (mu, sig)

        def lin(lvl: int, P: Tensor) -> Tensor:
            """``P [B, K, G_lvl, D_lvl]`` → ``[B, K, d]``: every later transition's linear part."""
            for nxt in range(lvl + 1, L + 1):
                t = trans[nxt]
                if t[0] == "merge":
                    B_, K, G4, D = P.shape
                    P = t[1].linear(P.reshape(B_, K, G4 // 4, 4 * D), convention)
                else:
                    P = norm_linear(t[1], P, convention)
            return P[:, :, 0]

        offset = torch.zeros(B, total.shape[-1], dtype=dt, device=dev)
        for lvl in range(first + 1, L + 1):                                        # transitions after embed
            t = trans[lvl]
            mu, sig = stats[lvl]
            o = t[1].offset(mu / sig, convention) if t[0] == "merge" else norm_offset(t[1], mu / sig, convention)
            offset = offset + lin(lvl, torch.einsum("bgn,bne->bge", weights[lvl], o)[:, None])[:, 0]
        return ReadoutMaps(weights, lin, offset, total.to(dt))

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed", _nhwc_seq))]

    pe = m.patch_embed

    def grids(hw):
        g = {0: (hw[0] // pe.patch_size[0], hw[1] // pe.patch_size[1])}
        for lvl in range(1, L + 1):
            h, w = g[lvl - 1]
            g[lvl] = (-(-h // 2), -(-w // 2)) if trans[lvl][0] == "merge" else (h, w)
        return g

    def check(images: Tensor) -> None:
        if tuple(images.shape[-2:]) != tuple(pe.img_size) and getattr(pe, "strict_img_size", True):
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but this Swin V2-CR expects "
                             f"{tuple(pe.img_size)} (build it with img_size=... or call model.set_input_size)")

    return SpatialPlan(
        family="timm-swinv2-cr", root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: level_in[b], hooks=hooks, finalize=finalize, grids=grids)


def _register() -> None:
    from timm.models import swin_transformer_v2_cr as cr

    register_rule("model", cr.SwinTransformerV2Cr)(swinv2_cr_plan)
    register_rule("block", cr.SwinTransformerV2CrBlock)(swinv2_cr_block)

    @register_rule("attention", cr.WindowMultiHeadAttention)
    class SwinV2CrWindowAttention(ProjInputAttention):
        """Swin V2-CR ``WindowMultiHeadAttention`` (scaled cosine attention, meta-network position bias,
        shift mask): heads meet only in ``proj``."""

        def __init__(self, path: str, module: nn.Module):
            H = module.num_heads
            super().__init__(path, module, H, module.proj.in_features // H)

    @register_rule("merge", cr.PatchMerging)
    def patch_merging_cr(path: str, ds: nn.Module) -> PatchMergeRule:
        return PatchMergeRule(path, ds, ds.norm, _ln(f"{path}.norm", ds.norm),
                              _linear(f"{path}.reduction", ds.reduction))


_register()
