"""The decomposition engine: hooks on the unmodified model, one forward pass, exact contributions.

``decompose(model, images)`` returns a :class:`Decomposition` whose ``contributions [B, K, d]`` sum
to the model's own readout; ``components_for(model)`` lists the components without running it.
Rules for module types live in :mod:`vitdecomp.engine.rules`; names in :mod:`vitdecomp.engine.names`.
The names below load on first use (PEP 562), so ``vitdecomp.engine.names`` (component names, used by
the store) imports neither torch nor timm; the engine itself loads torch and timm, never Ray, Lance
or pyarrow.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Decomposition": ".engine", "block_paths": ".engine", "components_for": ".engine",
            "decompose": ".engine", "select_blocks": ".engine", "Component": ".names",
            "register_rule": ".rules", "plan_for": ".rules.models", "with_post": ".rules.models",
            "RuleContext": ".rules"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
