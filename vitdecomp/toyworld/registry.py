"""Named architectures of the toy world, registered with timm and open_clip on import so that the
normal ``load_model`` path (name + local checkpoint) builds them everywhere, Ray workers included.

- ``timm:vitdecomp_toy_vit``: a timm ``VisionTransformer`` for 64 px images (patch 8, dim 64,
  depth 4, 4 heads, 2 classes) — README “The toy world”'s tiny classifier.
- ``open_clip:vitdecomp-toy-clip``: an open_clip CLIP (vision ViT 64 px, patch 8, width 64, depth 4,
  4 heads; text transformer width 64, depth 2; joint dim 64).
"""
from __future__ import annotations

import os

TOY_VIT = "timm:vitdecomp_toy_vit"
TOY_CLIP = "open_clip:vitdecomp-toy-clip"
_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    import open_clip
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    from ..models import register_extension

    open_clip.add_model_config(os.path.join(os.path.dirname(__file__), "vitdecomp-toy-clip.json"))
    register_extension("vitdecomp.toyworld")

    @register_model
    def vitdecomp_toy_vit(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                          cache_dir=None, **kwargs):
        if pretrained:
            raise ValueError("vitdecomp_toy_vit has no published weights: train it with the toy world "
                             "(vitdecomp demo) and pass checkpoint=<file>")
        args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=2)
        args.update(kwargs)
        model = VisionTransformer(**args)
        model.pretrained_cfg = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 1.0,
                                "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                "num_classes": args["num_classes"]}
        return model
