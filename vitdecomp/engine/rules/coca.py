"""open_clip CoCa: a ViT whose readout is an attentional pooler (``attentional_pool=True``).

open_clip's ``VisionTransformer`` with ``attentional_pool=True`` (CoCa) reads its last stream ``x_L``
through an ``AttentionalPooler``: ``n_queries`` learned queries (``ln_q(query)``) attend, with one
``nn.MultiheadAttention`` (``kdim = vdim = width``, pool width ``output_dim``), to ``ln_k(x_L)``; then
``ln_post`` per output token, and ``pool_type='tok'`` takes query 0 as the contrastive embedding
(the other queries are the caption tokens)::

    encode_image(x) = proj^T ln_post( attn_pool(x_L)[:, 0] )        (normalised when asked)

With the pooler's attention probabilities ``α_h[n]`` (query 0, head ``h``) and ``ln_k``'s per-token
``σ_n`` frozen, query 0's output ``Σ_h W_O,h (W_v,h (γ ⊙ C(Σ_n α_h[n] x_L[n] / σ_n) + β) + b_v,h) + b_O``
is linear in the last stream: the same per-position readout as timm's SigLIP MAP head
(:class:`~.families.LatentPoolRule`, one weight group per pool head), read here from the
``MultiheadAttention``'s own in-/out-projections. ``ln_post`` (frozen statistics of the pooled vector)
and ``proj`` follow as the readout chain. The caption tokens (queries 1…) do not reach the readout.

The blocks' ``nn.MultiheadAttention`` heads are recomputed per position from each module's input
(:meth:`~.attention.MultiheadAttentionRule.position_hooks`). Refused before any forward pass: the
``'parallel'`` / ``'cascade'`` pooler pairs, ``pool_type`` other than ``'tok'``, a pooler
``MultiheadAttention`` with ``add_bias_kv``/``add_zero_attn``, sequence-first blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .affine import PostOp, layernorm_stats
from .families import LatentPoolRule, _ln, _post_norm, _store_input, _store_output, block_units
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan


class _Proj:
    """A ``weight``/``bias`` pair read like an ``nn.Linear`` by :class:`LatentPoolRule`."""

    def __init__(self, weight: Tensor, bias):
        self.weight, self.bias = weight, bias


class _PoolerView:
    """open_clip's ``AttentionalPooler`` (query 0) seen as timm's ``AttentionPoolLatent``: ``latent`` =
    ``ln_q(query[:1])``, ``q`` / ``kv`` / ``proj`` from the ``MultiheadAttention``'s projections, no MLP.
    Read lazily, so the pooler's current parameters (and dtype) are used."""

    mlp = None

    def __init__(self, pooler: nn.Module):
        self.pooler = pooler
        mha = pooler.attn
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.scale = mha.head_dim ** -0.5            # scaled_dot_product_attention's default

    def _w(self):
        mha = self.pooler.attn
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.detach().split(E, 0)
        else:
            w_q, w_k, w_v = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        return E, w_q, w_k, w_v, b

    @property
    def latent(self) -> Tensor:
        with torch.no_grad():
            return self.pooler.ln_q(self.pooler.query[:1]).detach()[None]      # [1, 1, E]

    @property
    def q(self) -> _Proj:
        E, w_q, _, _, b = self._w()
        return _Proj(w_q, None if b is None else b[:E])

    @property
    def kv(self) -> _Proj:
        E, _, w_k, w_v, b = self._w()
        return _Proj(torch.cat([w_k, w_v], 0), None if b is None else b[E:])

    @property
    def proj(self) -> _Proj:
        op = self.pooler.attn.out_proj
        return _Proj(op.weight.detach(), None if op.bias is None else op.bias.detach())


class AttentionalPoolerRule(LatentPoolRule):
    """``pool`` rule for open_clip's ``AttentionalPooler``, read at query 0 (the contrastive token):
    :class:`LatentPoolRule`'s frozen per-position maps over :class:`_PoolerView`. ``pool_in`` is
    ``ln_k``'s output (the pool's per-token norm), ``pool_out`` query 0's attention output."""

    def __init__(self, path: str, pool: nn.Module):
        mha = pool.attn
        if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first:
            raise UnsupportedModuleError(f"{path}.attn: {type(mha).__qualname__} is not a batch-first "
                                         "nn.MultiheadAttention (open_clip's AttentionalPooler has one)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModuleError(f"{path}.attn: MultiheadAttention with add_bias_kv/add_zero_attn is not "
                                         "decomposed")
        self.path, self.pooler = path, pool
        self.module = _PoolerView(pool)
        self.components = []
        self.k_spec = _ln(f"{path}.ln_k", pool.ln_k)
        rule_for("norm", f"{path}.ln_q", pool.ln_q)

    def hooks(self, store: dict) -> list:
        p = self.pooler
        return [p.register_forward_pre_hook(_store_input(store, "final_in")),
                p.ln_k.register_forward_hook(_store_output(store, "pool_in")),
                p.register_forward_hook(_store_output(store, "pool_out", lambda t: t[:, 0]))]


def coca_vit_plan(m: nn.Module, check) -> SpatialPlan:
    """open_clip ``VisionTransformer`` with an ``AttentionalPooler`` (CoCa): see the module docstring.
    Reached through the open_clip ViT model rule (:mod:`.models`), which gives the image-size ``check``."""
    if getattr(m, "attn_pool_contrastive", None) is not None:
        raise UnsupportedModuleError(f"attn_pool_contrastive: attentional_pool={m.attn_pool_type!r} (a second "
                                     "pooler) is not decomposed; only attentional_pool=True (CoCa)")
    if m.pool_type != "tok":
        raise UnsupportedModuleError(f"pool_type={m.pool_type!r}: with an attentional pooler only 'tok' (query 0, "
                                     "the contrastive token) is decomposed")
    if not m.transformer.batch_first:
        raise UnsupportedModuleError("transformer: sequence-first open_clip blocks with an attentional pooler are "
                                     "not decomposed")
    if not isinstance(m.patch_dropout, nn.Identity):
        raise UnsupportedModuleError("patch_dropout: open_clip ViT with patch dropout is not decomposed")
    prule = rule_for("pool", "attn_pool", m.attn_pool, "is not open_clip's AttentionalPooler")("attn_pool",
                                                                                              m.attn_pool)
    final = prule.k_spec
    post = [_post_norm("ln_post", m.ln_post)] + ([PostOp("proj", weight=m.proj.T)] if m.proj is not None else [])
    blocks, units = [], []
    for i, blk in enumerate(m.transformer.resblocks):
        path = f"transformer.resblocks.{i}"
        blocks.append((i, path, blk))
        units += block_units(rule_for("block", path, blk)(path, blk), i, 0)
    ph, pw = m.patch_size

    def finalize(store, convention, first_level) -> ReadoutMaps:
        x = store["final_in"]
        dt = x.dtype if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        mu, sigma = layernorm_stats(x, final)                                           # [B, N, 1]
        return prule.maps(store, x, mu, sigma, final, convention, post)

    def readout(x: Tensor) -> Tensor:
        out = m(x)
        return out[0] if isinstance(out, tuple) else out

    return SpatialPlan(
        family="open_clip-coca", root=m, blocks=blocks, units=units, readout=readout,
        check_input=check,
        embed_hook=lambda module, store: [module.register_forward_pre_hook(_store_input(store, "embed"))],
        level_of_input=lambda b: 0, hooks=prule.hooks, finalize=finalize,
        grids=lambda hw: {0: (hw[0] // ph, hw[1] // pw)}, num_prefix_tokens=1)


def _register() -> None:
    from open_clip.coca_model import CoCa
    from open_clip.transformer import AttentionalPooler

    register_rule("pool", AttentionalPooler)(AttentionalPoolerRule)

    @register_rule("model", CoCa)
    def open_clip_coca(m: nn.Module):
        """CoCa's ``encode_image`` is its vision tower's contrastive output (the tower's own rule)."""
        return rule_for("model", "visual", m.visual)(m.visual)


_register()

__all__ = ["AttentionalPoolerRule", "coca_vit_plan"]
