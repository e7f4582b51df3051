"""Model rule for open_clip's ``TimmModel`` vision tower: a timm ``trunk`` plus an adapter ``head``.

open_clip builds SigLIP, EVA-CLIP, PE, ViTamin, MobileCLIP, ConvNeXt … towers as ``TimmModel``::

    visual(x) = head(trunk(x)),   trunk(x) = classifier(pre_logits(x))

``trunk`` is an ordinary timm model, decomposed by its own registered rule (:func:`plan_for`: ViT,
SigLIP attention pool, EVA, Swin, MaxViT, …). Everything after the trunk's readout is affine here:

- the trunk's classifier (``timm_proj`` unset: open_clip builds the trunk with
  ``num_classes=embed_dim`` and its ``head`` Linear is the projection), an ``nn.Linear`` or
  ``nn.Identity``;
- ``head.drop`` (dropout, the identity in eval) and ``head.proj`` (``timm_proj='linear'``, with or
  without bias).

Those maps are appended to the trunk plan's readout chain (``post``), so ``z = encode_image(x)``
exactly. Refused before any forward pass, with the module path: ``timm_proj='mlp'`` (``head.mlp``,
a non-linear map of the pooled feature), ``timm_pool='abs_attn'``/``'rot_attn'`` (``head.pool``), a
trunk head with a non-linear ``pre_logits`` layer (MaxViT's tanh), and any trunk without a rule
(ConvNeXt, FastViT, …: the trunk's own error, its paths prefixed with ``trunk.``).

Component names keep the upstream module path under the vision tower (README “Components and names”):
``trunk.blocks.11.attn.head.3``, ``trunk.attn_pool.mlp``, ``trunk.layers.2.blocks.1.mlp``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from torch import nn

from ...errors import UnsupportedModuleError
from .affine import PostOp
from .models import ModelPlan, plan_for, with_post
from .registry import register_rule, rule_for
from .spatial import SpatialPlan

TRUNK = "trunk."


def _where(trunk: nn.Module) -> str:
    return f"{type(trunk).__module__}.{type(trunk).__qualname__}"


def _prefix_message(msg: str) -> str:
    """A trunk rule's error, its module paths made relative to the vision tower (``trunk.…``)."""
    if msg.startswith("<root>"):
        return "trunk" + msg[len("<root>"):]
    head, sep, _ = msg.partition(": ")
    if sep and head and " " not in head:
        return TRUNK + msg
    return "trunk: " + msg


def trunk_plan(trunk: nn.Module):
    """The trunk's plan from its own registered rule; errors name paths under ``trunk.``."""
    try:
        return plan_for(trunk)
    except UnsupportedModuleError as e:
        raise UnsupportedModuleError(
            f"{_prefix_message(str(e))} [open_clip TimmModel: its vision tower is the timm model {_where(trunk)} "
            "at 'trunk'; only trunks of the supported timm families are decomposed (README “Supported models”)]"
        ) from None


def _classifier(trunk: nn.Module) -> tuple[str, Optional[nn.Module]]:
    """The trunk's classifier (what ``forward_head(pre_logits=False)`` applies last) and its path."""
    get = getattr(trunk, "get_classifier", None)
    if get is None:
        raise UnsupportedModuleError(f"trunk: {_where(trunk)} has no get_classifier(); its head cannot be "
                                     "checked to be affine")
    cls = get()
    if isinstance(cls, (tuple, list)):                  # DeiT distilled: (head, head_dist), averaged
        if all(isinstance(c, nn.Identity) for c in cls):
            return "", None
        raise UnsupportedModuleError(f"trunk: {_where(trunk)} has {len(cls)} classifiers whose outputs are combined; "
                                     "build the open_clip tower with timm_proj='linear' or 'none' (num_classes=0)")
    if isinstance(cls, nn.Identity) or cls is None:
        return "", None
    path = next((n for n, mod in trunk.named_modules() if mod is cls), "head")
    if not isinstance(cls, nn.Linear):
        raise UnsupportedModuleError(
            f"trunk.{path}: the trunk's classifier is a {type(cls).__module__}.{type(cls).__qualname__}, not an "
            "nn.Linear; only a linear projection (or none) after the pooled feature is decomposed exactly")
    return path, cls


def _check_pre_logits(trunk: nn.Module) -> None:
    """Refuse a trunk head whose ``pre_logits`` layer is non-linear (timm NormMlpClassifierHead with
    ``hidden_size``: Linear + tanh): the trunk's readout would stop before it, open_clip's after it."""
    pre = getattr(getattr(trunk, "head", None), "pre_logits", None)
    if isinstance(pre, nn.Module) and not isinstance(pre, nn.Identity):
        raise UnsupportedModuleError(
            f"trunk.head.pre_logits: {type(pre).__qualname__} (a Linear followed by a non-linear activation) sits "
            "between the trunk's pooled feature and open_clip's projection; it is not decomposed exactly. Build the "
            "trunk without a head hidden layer (head_hidden_size=None)")


def head_ops(m: nn.Module) -> list[PostOp]:
    """Affine maps of ``TimmModel.head`` (``drop``, ``proj``), refusing the non-linear ones."""
    ops = []
    for name, mod in m.head.named_children():
        path = f"head.{name}"
        if isinstance(mod, nn.Linear):
            ops.append(PostOp(path, weight=mod.weight, bias=mod.bias))
        elif name == "mlp":
            raise UnsupportedModuleError(
                f"{path}: {type(mod).__module__}.{type(mod).__qualname__} (open_clip timm_proj='mlp': "
                "Linear → GELU → Linear) is a non-linear map of the pooled feature; it cannot be split exactly "
                "into additive contributions. Architectures with timm_proj='linear' or 'none' are decomposed")
        elif name == "pool":
            raise UnsupportedModuleError(
                f"{path}: {type(mod).__module__}.{type(mod).__qualname__} (open_clip timm_pool='abs_attn'/'rot_attn', "
                "an attention pool over a CNN feature map) is not decomposed; use timm_pool='' / 'avg' / 'token' / "
                "'map' with a supported timm trunk")
        else:
            rule_for("scale", path, mod)          # dropout: the identity in eval, anything else is refused
    return ops


def _prefixed_attn(attn, memo: dict):
    """A copy of an attention rule whose ``path`` (the key of token requests) is under ``trunk.``."""
    if attn is None or not hasattr(attn, "path"):
        return attn
    if id(attn) not in memo:
        memo[id(attn)] = copy.copy(attn)
        memo[id(attn)].path = TRUNK + attn.path
    return memo[id(attn)]


def _prefix_block(entry: tuple) -> tuple:
    """A block's rule with every path (block, branches, attention rules) under ``trunk.``."""
    i, path, module, rule = entry
    memo: dict = {}
    changes = dict(path=TRUNK + rule.path, attn_path=TRUNK + rule.attn_path, mlp_path=TRUNK + rule.mlp_path,
                   attn=_prefixed_attn(rule.attn, memo))
    if getattr(rule, "branches", None):
        changes["branches"] = [dataclasses.replace(br, path=TRUNK + br.path, attn=_prefixed_attn(br.attn, memo))
                               for br in rule.branches]
    return i, TRUNK + path, module, dataclasses.replace(rule, **changes)


def _prefix_op(op: PostOp) -> PostOp:
    return dataclasses.replace(op, path=TRUNK + op.path)


def with_head(m: nn.Module, plan, ops: list[PostOp]):
    """The trunk's ``plan`` re-rooted at the vision tower ``m``: names prefixed with ``trunk.``, the
    readout replaced by ``m`` itself and ``ops`` appended to the readout chain (:func:`with_post`)."""
    changes = dict(family=f"open_clip-timm/{plan.family}", root=m, post=[_prefix_op(op) for op in plan.post])

    def readout(x):
        return m(x)

    if isinstance(plan, ModelPlan):
        changes["blocks"] = [_prefix_block(b) for b in plan.blocks]
    elif isinstance(plan, SpatialPlan):
        finalize = plan.finalize

        def finalize_prefixed(store, convention, first_level):
            maps = finalize(store, convention, first_level)
            return dataclasses.replace(maps, extra={TRUNK + k: v for k, v in maps.extra.items()},
                                       post=[_prefix_op(op) for op in maps.post])

        changes.update(finalize=finalize_prefixed, blocks=[(b[0], TRUNK + b[1], *b[2:]) for b in plan.blocks],
                       units=[dataclasses.replace(u, name=TRUNK + u.name) for u in plan.units],
                       extra_components=[(kind, TRUNK + name) for kind, name in plan.extra_components])
    else:
        raise UnsupportedModuleError(f"trunk: its plan is a {type(plan).__qualname__}, which the open_clip TimmModel "
                                     "rule cannot extend (expected a ModelPlan or a SpatialPlan)")
    return with_post(dataclasses.replace(plan, **changes), ops, readout=readout)


def _register() -> None:
    from open_clip.timm_model import TimmModel

    @register_rule("model", TimmModel)
    def open_clip_timm(m: nn.Module):
        """open_clip ``TimmModel``: the trunk's own plan, then its classifier and ``head`` as affine maps."""
        ops = head_ops(m)                       # refuse a non-linear adapter head first: nothing else matters
        trunk = m.trunk
        _check_pre_logits(trunk)
        path, cls = _classifier(trunk)
        plan = trunk_plan(trunk)
        if cls is not None:
            ops = [PostOp(TRUNK + path, weight=cls.weight, bias=cls.bias)] + ops
        return with_head(m, plan, ops)


_register()
