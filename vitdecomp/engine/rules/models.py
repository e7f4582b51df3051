"""Model rules: a whole vision tower → a :class:`ModelPlan` (blocks, pooling, affine readout chain).

The readout ``z`` is ``post(pool(x_L))``: the last block's residual stream ``x_L [B, N, D]``
pooled over positions (CLS token or mean of patch tokens) and then a chain of affine maps with
frozen statistics (final LayerNorm, pooled-feature norm, projection). A per-token norm followed by
mean pooling is not a map of the pooled stream: it weighs every position by its own frozen ``1/σ_n``
and goes through a per-position plan (:class:`~.spatial.SpatialPlan`), as do attention-pool heads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from ...errors import InputError, UnsupportedModuleError
from .registry import register_rule, rule_for
from .affine import PostOp
from .blocks import BlockRule
from .pool import Pooling


@dataclass
class ModelPlan:
    """Everything the engine needs about one vision tower.

    ``blocks``: (index, path, module, rule) for every residual block, in order;
    ``layout``: ``"BND"`` or ``"NBD"`` (sequence-first blocks, old open_clip);
    ``readout``: the model's own function images → ``z`` (unmodified upstream code);
    ``grid``: image ``(H, W)`` → patch grid; ``check_input`` raises on unusable images.
    """

    family: str
    root: nn.Module
    blocks: list[tuple[int, str, nn.Module, BlockRule]]
    pooling: Pooling
    post: list[PostOp]
    layout: str
    num_prefix_tokens: int
    readout: Callable[[Tensor], Tensor]
    grid: Callable[[tuple[int, int]], tuple[int, int]]
    check_input: Callable[[Tensor], None]


def plan_for(model: nn.Module) -> ModelPlan:
    """Resolve every rule the model needs; raises before any forward pass if one is missing.

    Returns a :class:`ModelPlan` (static readout weighting: CLS token, mean pooling) or a
    :class:`~.spatial.SpatialPlan` (per-position readout weights). A model rule that wraps another
    tower (``plan_for(trunk)``) adds its own affine readout maps with :func:`with_post`.
    """
    return rule_for("model", "", model)(model)


def with_post(plan, ops: list, readout: Optional[Callable[[Tensor], Tensor]] = None, **changes):
    """A copy of ``plan`` (either kind) with the affine maps ``ops`` (:class:`~.affine.PostOp`)
    appended after its readout chain, and optionally a new ``readout`` function (the wrapper's own
    forward, e.g. ``lambda x: wrapper(x)``) and other field changes (``family=...``, ``root=...``).

    For a wrapper model whose readout is ``ops(trunk readout)``: a model rule returns
    ``with_post(plan_for(trunk), ops, readout=...)``. Works for :class:`ModelPlan` and
    :class:`~.spatial.SpatialPlan` alike (``plan.post`` is the chain in both).
    """
    if readout is not None:
        changes["readout"] = readout
    return dataclasses.replace(plan, post=list(plan.post) + list(ops), **changes)


def _blocks(prefix: str, seq: nn.Module) -> list:
    out = []
    for i, blk in enumerate(seq):
        path = f"{prefix}.{i}"
        out.append((i, path, blk, rule_for("block", path, blk)(path, blk)))
    return out


def _norm(path: str, module: nn.Module) -> PostOp:
    return PostOp(path, spec=rule_for("norm", path, module)(module))


def _fixed_size_check(expected: tuple[int, int], what: str) -> Callable[[Tensor], None]:
    def check(images: Tensor) -> None:
        if tuple(images.shape[-2:]) != tuple(expected):
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but {what} expects {tuple(expected)}; "
                             "preprocess with the model's own transform (vitdecomp.load_model(...).transform)")
    return check


def _stride(pe) -> tuple[int, int]:
    """Pixels per token of a timm patch embedding (a hybrid's backbone reduction included)."""
    r = pe.feat_ratio(as_scalar=False) if hasattr(pe, "feat_ratio") else pe.patch_size
    return tuple(r)


def _patch_check(pe) -> Callable[[Tensor], None]:
    def check(images: Tensor) -> None:
        p = _stride(pe)
        if images.shape[-2] % p[0] or images.shape[-1] % p[1]:
            raise InputError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {tuple(p)}")
    return check


def _patch_grid(pe) -> Callable[[tuple[int, int]], tuple[int, int]]:
    """Image ``(H, W)`` → token grid, by timm's own ``dynamic_feat_size`` where the embedding has it."""
    def grid(hw: tuple[int, int]) -> tuple[int, int]:
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(tuple(hw)))
        p = pe.patch_size
        return hw[0] // p[0], hw[1] // p[1]
    return grid


def _size_check(m: nn.Module, what: str) -> Callable[[Tensor], None]:
    """Fixed image size only where the model has one: a strict patch embedding feeding a fixed-size
    position embedding (a hybrid stem without position embedding takes any multiple of its stride)."""
    from timm.layers import PatchEmbed

    pe = m.patch_embed
    strict = getattr(pe, "strict_img_size", True) and (getattr(m, "pos_embed", None) is not None
                                                      or isinstance(pe, PatchEmbed))
    if getattr(m, "dynamic_img_size", False) or not strict or getattr(pe, "img_size", None) is None:
        return _patch_check(pe)
    return _fixed_size_check(pe.img_size, what)


def vit_plan(m: nn.Module, family: str, what: str, has_cls: bool, check: Callable[[Tensor], None],
             grid: Callable[[tuple[int, int]], tuple[int, int]]):
    """The plan of a timm ViT-style tower: ``blocks``, final ``norm``, ``attn_pool`` or ``global_pool``
    (``'token'`` / ``'avg'`` over ``num_prefix_tokens:`` unless ``pool_include_prefix``), ``fc_norm``,
    ``head_drop``; readout ``forward_head(forward_features(x), pre_logits=True)``. Used by timm
    ``VisionTransformer`` and ``NaFlexVit`` (:mod:`.naflexvit`).

    CLS / mean pooling without a per-token norm: a :class:`ModelPlan` (``family``). An attention pool
    (MAP head) or a per-token final norm before mean pooling: the per-position plan of
    :func:`~.families.vit_spatial_plan` (families ``timm-vit-map`` / ``timm-vit-gap``)."""
    npt = m.num_prefix_tokens
    if m.attn_pool is not None or (m.global_pool == "avg" and not isinstance(m.norm, nn.Identity)):
        from .families import vit_spatial_plan

        return vit_spatial_plan(m, check, grid)
    if m.global_pool == "token":
        if npt < 1 or not has_cls:
            raise UnsupportedModuleError(f"{what} with global_pool='token' but no class token")
        pooling = Pooling("token", index=0)
    elif m.global_pool == "avg":
        pooling = Pooling("avg", start=0 if m.pool_include_prefix else npt)
    else:
        raise UnsupportedModuleError(f"{what} global_pool={m.global_pool!r}: only 'token', 'avg' and 'map' are "
                                     "linear readouts (max pooling is not)")
    rule_for("scale", "head_drop", m.head_drop)
    return ModelPlan(
        family=family, root=m, blocks=_blocks("blocks", m.blocks), pooling=pooling,
        post=[_norm("norm", m.norm), _norm("fc_norm", m.fc_norm)], layout="BND", num_prefix_tokens=npt,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), grid=grid, check_input=check)


def _register() -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import VisionTransformer as OcViT

    @register_rule("model", TimmViT)
    def timm_vit(m: TimmViT) -> ModelPlan:
        return vit_plan(m, "timm-vit", "timm ViT", m.cls_token is not None, _size_check(m, "this timm ViT"),
                        _patch_grid(m.patch_embed))

    from timm.models.eva import Eva

    @register_rule("model", Eva)
    def timm_eva(m: Eva) -> ModelPlan:
        """EVA / EVA-02 / Perception Encoder / DINOv3: rotary embeddings live in the attention rule; readout
        as for timm ViT. An attention-pool (MAP) head (PE core) is a per-position readout: the same plan as a
        timm ViT's MAP head (:func:`~.families.vit_spatial_plan`, the ``pool`` rule of the pool). A per-token
        final norm before mean pooling (DINOv3's default ``global_pool='avg'``, ``use_fc_norm=False``; timm
        averages the patch tokens only, class and register tokens excluded) is the same per-position plan as
        a timm ViT's (:func:`~.families.vit_spatial_plan`: each patch weighted by its frozen ``1/σ_n``)."""
        if getattr(m, "patch_drop", None) is not None:
            raise UnsupportedModuleError("patch_drop: EVA with patch dropout is not decomposed")
        if m.attn_pool is not None:
            from .families import vit_spatial_plan

            plan = vit_spatial_plan(m, _size_check(m, "this timm EVA"), _patch_grid(m.patch_embed))
            return with_post(plan, [], family="timm-eva-map")
        npt = m.num_prefix_tokens
        if m.global_pool == "token":
            if npt < 1 or m.cls_token is None:
                raise UnsupportedModuleError("EVA with global_pool='token' but no class token")
            pooling = Pooling("token", index=0)
        elif m.global_pool == "avg":
            if not isinstance(m.norm, nn.Identity):    # DINOv3: norm(x_L) per token, mean over patches
                from .families import vit_spatial_plan

                plan = vit_spatial_plan(m, _size_check(m, "this timm EVA"), _patch_grid(m.patch_embed))
                return with_post(plan, [], family="timm-eva-gap")
            pooling = Pooling("avg", start=npt)
        else:
            raise UnsupportedModuleError(f"EVA global_pool={m.global_pool!r}: only 'token' and 'avg' are linear")
        rule_for("scale", "head_drop", m.head_drop)
        pe = m.patch_embed
        check = _size_check(m, "this timm EVA")
        return ModelPlan(
            family="timm-eva", root=m, blocks=_blocks("blocks", m.blocks), pooling=pooling,
            post=[_norm("norm", m.norm), _norm("fc_norm", m.fc_norm)], layout="BND", num_prefix_tokens=npt,
            readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), grid=_patch_grid(pe),
            check_input=check)

    @register_rule("model", OcViT)
    def open_clip_vit(m: OcViT) -> ModelPlan:
        if m.attn_pool is not None:         # CoCa: an attentional pooler reads the last stream (rules/coca.py)
            from .coca import coca_vit_plan

            return coca_vit_plan(m, _fixed_size_check(m.image_size, "this open_clip ViT"))
        if m.pool_type == "tok":
            pooling = Pooling("token", index=0)
        elif m.pool_type == "avg" and m.final_ln_after_pool:
            pooling = Pooling("avg", start=1)
        else:
            raise UnsupportedModuleError(f"open_clip ViT pool_type={m.pool_type!r} with final_ln_after_pool="
                                         f"{m.final_ln_after_pool} is not supported yet")
        post = [_norm("ln_post", m.ln_post)]
        if m.proj is not None:
            post.append(PostOp("proj", weight=m.proj.T))
        blocks = _blocks("transformer.resblocks", m.transformer.resblocks)
        ph, pw = m.patch_size

        def readout(x: Tensor) -> Tensor:
            out = m(x)
            return out[0] if isinstance(out, tuple) else out

        return ModelPlan(
            family="open_clip-vit", root=m, blocks=blocks, pooling=pooling, post=post,
            layout="BND" if m.transformer.batch_first else "NBD", num_prefix_tokens=1, readout=readout,
            grid=lambda hw: (hw[0] // ph, hw[1] // pw), check_input=_fixed_size_check(m.image_size, "this open_clip ViT"))

    @register_rule("model", CLIP, CustomTextCLIP)
    def open_clip_model(m: nn.Module) -> ModelPlan:
        return rule_for("model", "visual", m.visual)(m.visual)


_register()
