"""The toy world (README “The toy world”): procedural images with planted attributes, tiny models trained on them,
and the offline demo. Importing this package registers its architectures with timm and open_clip
(``timm:vitdecomp_toy_vit``, ``open_clip:vitdecomp-toy-clip``); Ray workers import it too when the
driver did (see :func:`vitdecomp.models.register_extension`)."""
from .registry import TOY_CLIP, TOY_VIT, register

register()

__all__ = ["TOY_CLIP", "TOY_VIT", "register"]
