"""timm PiT (``timm.models.pit.PoolingVisionTransformer``): pooling-based ViT with class token(s).

Forward (timm): ``x = ConvEmbedding(img) + pos_embed`` (a ``[B, C, H, W]`` map), ``c = cls_token`` (one
token, or class + distillation token for ``*_distilled`` models), then ``transformers.<s>`` (``Transformer``)::

    x, c = pool(x, c)                 (s > 0: ``Pooling``: depthwise strided conv on x, Linear ``fc`` on c)
    t = blocks([c, x_flat])           (timm ``Block``\\ s on the concatenated sequence; ``norm`` = Identity)
    c, x = t[:, :T], t[:, T:]

and ``z = forward_head(norm(c), pre_logits=True)``: the normed class token, or for distilled models the
mean of the normed class and distillation tokens (what both heads read; ``head_drop`` is the identity in
eval). Per-token final LayerNorm with frozen σ, so the readout weighs class-token position ``t`` by
``1/(|P| σ_t)``.

Between stages the class-token stream passes through ``pool.fc``, a per-token affine map, while patch
tokens reach the class tokens only through attention. Following CaiT / XCiT, the components are the
direct effects on the *class-token stream*: ``embed`` (the learned class token(s), or the class-token
stream entering the first decomposed block), ``transformers.<s>.blocks.<i>.attn.head.<h>`` and
``transformers.<s>.blocks.<i>.mlp`` (their outputs at the class-token positions), each carried through
every later ``fc`` (weight; its bias goes to ``bias``) and the final norm; ``bias`` also gets the
out-projection biases and the final β. The patch embedding, the position embedding and the pooling convs
act on patch tokens only: their effect is inside the heads (keys and values). Every stage is a level of a
per-position plan (:class:`~.spatial.SpatialPlan`) whose stream is the ``T`` class-token positions; token
terms are per class-token position (as for CaiT / XCiT). The ``blocks`` option indexes all blocks over all
stages in order.

Refused (:class:`~vitdecomp.errors.UnsupportedModuleError`): ``global_pool=''`` (no pooled readout), a
stage norm (``Transformer.norm``) other than the identity, a final norm that is not a LayerNorm/RMSNorm.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .affine import layernorm_stats
from .registry import register_rule, rule_for
from .spatial import PrefixStore, ReadoutMaps, SpatialPlan, Unit, norm_linear, norm_offset


def _class_token_unit(u: Unit, T: int) -> Unit:
    orig = u.hooks

    def hooks(store, key, ctx=None):
        return orig(PrefixStore(store, T), key, ctx)

    u.hooks = hooks
    return u


def _register() -> None:
    from timm.models.pit import PoolingVisionTransformer

    @register_rule("model", PoolingVisionTransformer)
    def pit_model(m: nn.Module) -> SpatialPlan:
        return pit_plan(m)


def pit_plan(m: nn.Module) -> SpatialPlan:
    """The per-position plan of a timm ``PoolingVisionTransformer`` (see the module docstring)."""
    from timm.models.pit import Pooling, Transformer

    from .families import block_units
    from .models import _fixed_size_check

    if m.global_pool != "token":
        raise UnsupportedModuleError(f"PoolingVisionTransformer global_pool={m.global_pool!r}: only the class-token "
                                     "readout (global_pool='token', every timm PiT) is decomposed")
    final = rule_for("norm", "norm", m.norm)(m.norm)
    if final.kind not in ("layernorm", "rmsnorm"):
        raise UnsupportedModuleError(f"norm: a final norm of kind {final.kind} is not supported for PiT")
    rule_for("scale", "head_drop", m.head_drop)
    rule_for("scale", "pos_drop", m.pos_drop)
    T = int(m.cls_token.shape[1])
    pos = [0, 1] if m.head_dist is not None else [0]
    if max(pos) >= T:
        raise UnsupportedModuleError(f"cls_token: {T} class token(s) but the readout reads positions {pos}")
    blocks, units, fcs = [], [], []
    level_of: dict[int, int] = {}
    for s, tr in enumerate(m.transformers):
        path = f"transformers.{s}"
        if not isinstance(tr, Transformer) or type(tr).forward is not Transformer.forward:
            raise UnsupportedModuleError(f"{path}: {type(tr).__qualname__} is not timm's pit.Transformer")
        if not isinstance(tr.norm, nn.Identity):
            raise UnsupportedModuleError(f"{path}.norm: {type(tr.norm).__qualname__}: a stage norm of the "
                                         "concatenated tokens is not decomposed for PiT (timm builds it as Identity)")
        if s == 0:
            if tr.pool is not None:
                raise UnsupportedModuleError(f"{path}.pool: a pooling before the first stage is not decomposed")
            fcs.append(None)
        else:
            p = tr.pool
            if not isinstance(p, Pooling) or type(p).forward is not Pooling.forward or not isinstance(p.fc, nn.Linear):
                raise UnsupportedModuleError(f"{path}.pool: {type(p).__qualname__} is not timm's pit.Pooling "
                                             "(depthwise conv on patches, Linear fc on the class tokens)")
            fcs.append(p.fc)
        for i, blk in enumerate(tr.blocks):
            bpath = f"{path}.blocks.{i}"
            j = len(blocks)
            rule = rule_for("block", bpath, blk, "is not timm's vision_transformer.Block")(bpath, blk)
            blocks.append((j, bpath, blk))
            level_of[j] = s
            units += [_class_token_unit(u, T) for u in block_units(rule, j, s)]
    if not blocks:
        raise UnsupportedModuleError("transformers: a PiT without blocks has no decomposable branch")
    L = len(fcs)                                     # levels 0 … L-1; the final norm reads level L-1

    def embed_hook(module, store):                   # the class-token stream entering this block
        return [module.register_forward_pre_hook(lambda _, args: store.__setitem__("embed", args[0][:, :T].clone()))]

    def hooks(store):
        return [m.norm.register_forward_pre_hook(lambda _, args: store.__setitem__("final_in", args[0])),
                m.norm.register_forward_hook(lambda _, __, out: store.__setitem__("final_out", out))]

    def lin(convention):
        def f(level: int, P: Tensor) -> Tensor:      # P [B, K, 1, D_level] → [B, K, d]
            x = P[:, :, 0]
            for s in range(level + 1, L):
                x = x @ fcs[s].weight.to(x.dtype).T
            return norm_linear(final, x, convention)
        return f

    def finalize(store, convention, first_level) -> ReadoutMaps:
        x = store["final_in"]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        B = x.shape[0]
        mu, sigma = layernorm_stats(x[:, pos], final)                           # [B, P, 1]
        w = torch.zeros(B, 1, T, dtype=dt, device=x.device)
        w[:, 0, pos] = 1.0 / (len(pos) * sigma[..., 0])                        # every fc is per token: same weights
        f = lin(convention)
        offset = norm_offset(final, mu / sigma, convention).mean(1)            # [B, d]
        mass = w.sum(-1)                                                        # [B, 1]
        for s in range(first_level + 1, L):                                    # fc biases after the first level
            b = fcs[s].bias
            if b is not None:
                offset = offset + f(s, (mass[..., None] * b.to(dt))[:, None])[:, 0]
        total = store["final_out"][:, pos].to(dt).mean(1)
        return ReadoutMaps({lvl: w for lvl in range(L)}, f, offset, total)

    return SpatialPlan(
        family="timm-pit", root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True),
        check_input=_fixed_size_check(m.patch_embed.img_size, "this timm PiT"), embed_hook=embed_hook,
        level_of_input=lambda b: level_of[b], hooks=hooks, finalize=finalize,
        grids=lambda hw: {lvl: (1, T) for lvl in range(L)}, num_prefix_tokens=0)


_register()

__all__ = ["pit_plan"]
