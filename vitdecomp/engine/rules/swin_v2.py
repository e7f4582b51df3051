"""Swin Transformer V2 (timm ``SwinTransformerV2``, ``swinv2_*``): the Swin per-position plan
(:func:`~.families.swin_plan`) with V2's rules.

- Block ``SwinTransformerV2Block``, post-norm: ``x + dp1(n1(attn(x)))`` then ``x + dp2(n2(mlp(x)))``.
  The branch norms' per-position ``σ`` are frozen (a LayerNorm with frozen σ is affine), as for the
  post-norm ViT blocks (:mod:`.vit_variants`): the attention rule carries ``norm1``
  (:meth:`~.vit_variants.ProjInputAttention.with_post_norm`), each head carries ``γ⊙C(b_O)/H`` of the
  out-projection bias (image-dependent through ``1/σ``), ``β`` goes to ``bias``; the MLP component is
  ``norm2``'s output.
- Attention ``WindowAttention`` (V2): scaled cosine attention with a continuous relative position
  bias changes only the attention probabilities; heads are read from the out-projection input.
- Merge ``PatchMerging`` (V2): ``norm(reduction(concat))`` (:class:`~.families.ReduceNormMergeRule`), the
  norm's per-position statistics frozen at the merged position.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ...errors import UnsupportedModuleError
from .blocks import Branch, BlockRule
from .families import ReduceNormMergeRule, _linear, _ln, swin_block, swin_plan
from .registry import register_rule, rule_for
from .spatial import SpatialPlan
from .vit_variants import ProjInputAttention


def swinv2_block(path: str, blk: nn.Module) -> BlockRule:
    """timm ``SwinTransformerV2Block``: Swin V1's windows/shift (:func:`~.families.swin_block`) with post-norm
    branches."""
    rule = swin_block(path, blk)
    a = rule.attn
    if not isinstance(a, ProjInputAttention):
        raise UnsupportedModuleError(f"{rule.attn_path}: {type(blk.attn).__qualname__} in a post-norm Swin V2 block "
                                     "is not supported (its rule does not read the out-projection input)")
    a.with_post_norm(f"{path}.norm1", blk.norm1)
    rule_for("norm", f"{path}.norm2", blk.norm2)
    attn_br = rule.branches[0]
    mlp_br = Branch("mlp", f"{path}.mlp", blk.norm2, rule.gain2)
    return dataclasses.replace(rule, mlp=blk.norm2, branches=[attn_br, mlp_br])


def swinv2_plan(m: nn.Module) -> SpatialPlan:
    """timm ``SwinTransformerV2``: :func:`~.families.swin_plan` (its rules resolved through the registry)."""
    return swin_plan(m, family="timm-swinv2")


def _register() -> None:
    from timm.models import swin_transformer_v2 as v2

    register_rule("model", v2.SwinTransformerV2)(swinv2_plan)
    register_rule("block", v2.SwinTransformerV2Block)(swinv2_block)

    @register_rule("attention", v2.WindowAttention)
    class SwinV2WindowAttention(ProjInputAttention):
        """Swin V2 ``WindowAttention`` (scaled cosine attention, continuous position bias, shift mask):
        heads meet only in ``proj``."""

        def __init__(self, path: str, module: nn.Module):
            H = module.num_heads
            super().__init__(path, module, H, module.proj.in_features // H)

    @register_rule("merge", v2.PatchMerging)
    def patch_merging_v2(path: str, ds: nn.Module) -> ReduceNormMergeRule:
        red = _linear(f"{path}.reduction", ds.reduction)
        if red.bias is not None:
            raise UnsupportedModuleError(f"{path}.reduction: a bias before the merge norm is not supported")
        return ReduceNormMergeRule(path, ds, ds.norm, _ln(f"{path}.norm", ds.norm), red)


_register()
