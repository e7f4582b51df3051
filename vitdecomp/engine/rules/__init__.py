"""Rules: how each module type's computation is decomposed exactly (one registry per role).

Importing this package registers the built-in rules; :func:`register_rule` adds your own.
"""
from .registry import ROLES, find_rule, list_rules, register_rule, rule_for
from . import affine, attention, blocks, models, families  # noqa: E402,F401  (registrations)

__all__ = ["ROLES", "find_rule", "list_rules", "register_rule", "rule_for"]
