"""Rules: how each module type's computation is decomposed exactly (one registry per role).

Importing this package registers the built-in rules; :func:`register_rule` adds your own (README
“Writing a rule”). Rules see the engine only through :class:`RuleContext`.
"""
from .registry import ROLES, find_rule, list_rules, register_rule, rule_for
from .context import RuleContext
from . import affine, attention, blocks, models, families  # noqa: E402,F401  (registrations)
from . import vit_variants  # noqa: E402,F401  (DeiT distilled, BEiT, CaiT, RelPos, post-norm, diff, parallel)
from . import open_clip_timm  # noqa: E402,F401  (open_clip TimmModel towers)
from . import swin_v2  # noqa: E402,F401  (Swin Transformer V2)
from . import coatnet  # noqa: E402,F401  (CoAtNet, CoAtNeXt, MaxxViT, parallel MaxViT)
from . import sam  # noqa: E402,F401  (SAM ViT: windowed attention, conv neck)
from . import swin_v2_cr  # noqa: E402,F401  (Swin Transformer V2-CR)
from . import xcit  # noqa: E402,F401  (XCiT: class-attention blocks with a class-token stream norm)
from . import naflexvit  # noqa: E402,F401  (NaFlexVit: flexible patch embedding, ViT readouts)
from . import levit  # noqa: E402,F401  (LeViT: BatchNorm linears, attention downsampling, mean readout)
from . import pit  # noqa: E402,F401  (PiT: class-token stream through the pooling fc's)
from . import coca  # noqa: E402,F401  (open_clip CoCa: attentional pooler readout)

__all__ = ["ROLES", "RuleContext", "find_rule", "list_rules", "register_rule", "rule_for"]
