"""Rule registries keyed by module type (one registry per role).

Roles (what a rule registered for a module type returns; see README “Writing a rule”):

- ``model``: the whole tower → a plan (:class:`~.models.ModelPlan` for a static readout weighting
  such as CLS or mean pooling, :class:`~.spatial.SpatialPlan` for per-position readout weights);
- ``block``: ``rule(path, module)`` → :class:`~.blocks.BlockRule` (its residual branches);
- ``attention``: ``rule(path, module)`` → an :class:`~.attention.AttentionRule` instance;
- ``branch``: a composite residual branch (MaxViT's MBConv) → :class:`~.blocks.Branch` list;
- ``merge``: a map between two resolutions (Swin ``PatchMerging``, MaxViT's stride-2 shortcut);
- ``pool``: a readout pooling module (SigLIP's ``AttentionPoolLatent``);
- ``norm``: ``rule(module)`` → :class:`~.affine.NormSpec`; ``scale``: ``rule(module)`` → gain or None.

Every family (ViT, EVA, open_clip, SigLIP, Swin, MaxViT) resolves each of these through
:func:`rule_for`, so a rule you register is used wherever its module type appears.
A rule is found along the module class's MRO. A subclass that overrides any method of the class
the rule was registered for does *not* inherit the rule: its computation may differ, and a
silently wrong decomposition is worse than an error. Unknown types raise :class:`UnsupportedModuleError` before any work starts.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from ...errors import UnsupportedModuleError

ROLES = ("model", "block", "attention", "norm", "scale", "branch", "merge", "pool")
_RULES: dict[str, dict[type, Any]] = {role: {} for role in ROLES}


def register_rule(role: str, *module_types: type) -> Callable:
    """Class/function decorator registering a rule for ``module_types`` in ``role``."""
    if role not in _RULES:
        raise ValueError(f"unknown rule role {role!r}; roles: {ROLES}")

    def add(rule):
        for t in module_types:
            _RULES[role][t] = rule
        return rule

    return add


def find_rule(role: str, module: nn.Module):
    """The rule registered for ``type(module)`` (or an ancestor whose ``forward`` it keeps), or None."""
    cls = type(module)
    for t in cls.__mro__:
        if t in _RULES[role]:
            return _RULES[role][t] if _keeps_methods(cls, t) else None
    return None


def _keeps_methods(cls: type, base: type) -> bool:
    """True when ``cls`` resolves every function defined on ``base`` to ``base``'s own."""
    return all(getattr(cls, name, None) is value
               for name, value in vars(base).items() if inspect.isfunction(value) and name != "__init__")


def rule_for(role: str, path: str, module: nn.Module, expected: str = ""):
    """Like :func:`find_rule` but raises a helpful error when no rule exists.

    ``expected`` (e.g. ``"is not timm's MaxxVitBlock"``) is put right after the path and type name
    to say what the family normally has at that place.
    """
    rule = find_rule(role, module)
    if rule is None:
        what = f"{type(module).__qualname__} {expected}; " if expected else ""
        raise UnsupportedModuleError(
            f"{path or '<root>'}: {what}no {role} rule for {type(module).__module__}.{type(module).__qualname__} "
            f"(known {role} types: {list_rules(role)}). vitdecomp only decomposes modules whose "
            f"computation it knows exactly; add one with @register_rule({role!r}, YourModule)."
        )
    return rule


def list_rules(role: str) -> list[str]:
    return sorted(t.__qualname__ for t in _RULES[role])

