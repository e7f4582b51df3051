"""The decomposition engine: hooks on the unmodified model, one forward pass, exact contributions.

``decompose(model, images)`` returns a :class:`Decomposition` whose ``contributions [B, K, d]`` sum
to the model's own readout; ``components_for(model)`` lists the components without running it.
Rules for module types live in :mod:`vitdecomp.engine.rules`; names in :mod:`vitdecomp.engine.names`.
Importing this package loads torch (and timm for its rule registrations), never Ray, Lance or pyarrow.
"""
from .engine import Decomposition, block_paths, components_for, decompose, select_blocks
from .names import Component
from .rules import register_rule
from .rules.models import plan_for

__all__ = ["Component", "Decomposition", "block_paths", "components_for", "decompose", "plan_for",
           "register_rule", "select_blocks"]
