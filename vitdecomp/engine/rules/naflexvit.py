"""timm ``NaFlexVit`` (``timm/models/naflexvit.py``): a ViT whose patch embedding (``embeds``:
patchify + Linear or conv, learned / factorized position embedding resized to the grid, class and
register tokens) accepts any image size, with timm ``Block`` or ``EvaBlock`` blocks (rotary variants).

Decomposed on the standard input path the engine uses: a plain image batch ``[B, 3, H, W]``
(``forward_features(x)`` then ``forward_head(..., pre_logits=True)``; ``embeds`` is the ``embed``
component, everything it adds included). The readout is the one of timm's ViT
(:func:`~.models.vit_plan`, the same code): ``global_pool='token'`` (C-RADIO) or ``'avg'`` with
``fc_norm`` (``*_gap``) are static weightings of the last stream; ``'map'`` (attention pool, SigLIP-style
``*_map`` / ``*_siglip``) and ``'avg'`` after a per-token final norm are per-position plans
(:func:`~.families.vit_spatial_plan`, the pool's ``pool`` rule :class:`~.families.LatentPoolRule`).
Blocks and attention resolve through the registry as for any ViT.

NaFlex's own inputs — a patch dictionary (``patches``, ``patch_coord``, ``patch_valid``) or
pre-patchified ``[B, N, P·P·C]`` tensors with padding masks — are refused before the forward pass
(:class:`~vitdecomp.errors.InputError`): pass the images themselves, one size per batch.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ...errors import InputError
from .models import _patch_grid, vit_plan, with_post
from .registry import register_rule


def _naflex_check(m: nn.Module) -> Callable[[Tensor], None]:
    """Plain images whose sides are multiples of the patch size (unless the embedding pads them)."""
    pe = m.embeds

    def check(images) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            what = type(images).__name__ if not isinstance(images, Tensor) else f"a {images.dim()}-D tensor"
            raise InputError(f"embeds: NaFlexVit is decomposed on plain image batches (B, 3, H, W), got {what}; "
                             "NaFlex patch dictionaries / pre-patchified inputs with patch_coord and patch_valid "
                             "are not supported: pass the images themselves (one size per batch)")
        p = tuple(pe.patch_size)
        if not pe.dynamic_img_pad and (images.shape[-2] % p[0] or images.shape[-1] % p[1]):
            raise InputError(f"embeds: image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}; "
                             "resize or crop to a multiple (NaFlexVit takes any multiple)")
    return check


def _register() -> None:
    from timm.models.naflexvit import NaFlexVit

    @register_rule("model", NaFlexVit)
    def naflexvit(m: nn.Module):
        """NaFlexVit: the timm ViT plan (module docstring); families ``timm-naflexvit`` (CLS / mean),
        ``timm-naflexvit-map`` (attention pool) and ``timm-naflexvit-gap`` (per-token norm + mean)."""
        plan = vit_plan(m, "timm-naflexvit", "NaFlexVit", bool(m.has_class_token), _naflex_check(m),
                        _patch_grid(m.embeds))
        if plan.family.startswith("timm-vit-"):                 # a per-position plan of vit_spatial_plan
            plan = with_post(plan, [], family="timm-naflexvit-" + plan.family.rsplit("-", 1)[1])
        return plan


_register()
