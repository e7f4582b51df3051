"""Per-position readout plans (:mod:`.spatial`): SigLIP attention pool, per-token norm + mean pool,
Swin and MaxViT. Everything is read from the unmodified upstream modules with forward hooks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModuleError
from . import rule_for
from .affine import NormSpec
from .blocks import _gain
from .spatial import ReadoutMaps, SpatialPlan, Unit, center, ln_stats, norm_linear, norm_offset


def _store_input(store: dict, key: str, convert=lambda t: t):
    def hook(_, args, kwargs=None):
        store[key] = convert(args[0] if args else next(iter(kwargs.values())))
    return hook


def _store_output(store: dict, key: str, convert=lambda t: t):
    def hook(_, __, out):
        store[key] = convert(out)
    return hook


def _linear(path: str, mod: nn.Module) -> nn.Linear:
    if not isinstance(mod, nn.Linear):
        raise UnsupportedModuleError(f"{path}: {type(mod).__qualname__} is not an nn.Linear")
    return mod


def _ln(path: str, mod: nn.Module) -> NormSpec:
    spec = rule_for("norm", path, mod)(mod)
    if spec.kind not in ("layernorm", "rmsnorm", "identity"):
        raise UnsupportedModuleError(f"{path}: norm kind {spec.kind} is not supported here")
    return spec


# ------------------------------------------------------------------------------ timm ViT blocks
def _vit_units(m: nn.Module) -> tuple[list, list[Unit]]:
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    blocks, units = [], []
    for i, blk in enumerate(m.blocks):
        path = f"blocks.{i}"
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise UnsupportedModuleError(f"{path}: only timm Block with timm Attention is decomposed with an "
                                         f"attention-pool or per-token-norm readout (got {type(blk).__qualname__})")
        a = blk.attn
        if not isinstance(a.norm, nn.Identity):
            raise UnsupportedModuleError(f"{path}.attn.norm: attention sub-norm with this readout is not supported yet")
        blocks.append((i, path, blk))
        proj = _linear(f"{path}.attn.proj", a.proj)

        def attn_hooks(store, key, a=a):
            return [a.proj.register_forward_pre_hook(_store_input(store, key))]

        def mlp_hooks(store, key, blk=blk):
            return [blk.mlp.register_forward_hook(_store_output(store, key))]

        units.append(Unit("attn", f"{path}.attn", "attn", i, 0, attn_hooks,
                          _gain(path, ("ls1", blk.ls1), ("drop_path1", blk.drop_path1)),
                          a.num_heads, a.head_dim, proj))
        units.append(Unit("branch", f"{path}.mlp", "mlp", i, 0, mlp_hooks,
                          _gain(path, ("ls2", blk.ls2), ("drop_path2", blk.drop_path2))))
    return blocks, units


def vit_spatial_plan(m: nn.Module, check, grid) -> SpatialPlan:
    """timm ViT whose readout is an attention pool (SigLIP MAP head) or a per-token final norm
    followed by mean pooling (SigLIP ``gap`` variants).

    Attention pool (``latent_len == 1``): with the pool's attention probabilities ``α_h[n]`` (the
    latent query over every token) and the final norm's per-token ``σ_n`` frozen, the pool's
    attention output is ``Σ_h W_O,h (W_v,h (γ ⊙ C(Σ_n α_h[n] x[n]/σ_n) + β) + b_v,h) + b_O``: linear in
    the last stream with one group per pool head. The pool's MLP (its residual branch) is the
    component ``attn_pool.mlp``; ``fc_norm`` follows as a frozen norm of the pooled vector.
    """
    blocks, units = _vit_units(m)
    npt = m.num_prefix_tokens
    final = _ln("norm", m.norm)
    pool = m.attn_pool
    extra = []
    if pool is not None:
        from timm.layers.attention_pool import AttentionPoolLatent

        if type(pool) is not AttentionPoolLatent:
            raise UnsupportedModuleError(f"attn_pool: {type(pool).__qualname__} is not timm's AttentionPoolLatent")
        if pool.latent_len != 1 or pool.pos_embed is not None:
            raise UnsupportedModuleError("attn_pool: only a single latent query without pool position embedding "
                                         "is decomposed")
        if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
            raise UnsupportedModuleError("attn_pool: q/k norms in the attention pool are not supported yet")
        if pool.mlp is not None:
            extra = [("mlp", "attn_pool.mlp")]
        start = 0
    else:
        if m.global_pool != "avg":
            raise UnsupportedModuleError(f"timm ViT global_pool={m.global_pool!r} is not decomposed")
        start = 0 if m.pool_include_prefix else npt
    if final.kind == "identity":
        raise UnsupportedModuleError("norm: a per-position readout needs the final norm (this model has none)")
    post = [_post_norm("fc_norm", m.fc_norm)]
    rule_for("scale", "head_drop", m.head_drop)

    def hooks(store):
        hs = [m.norm.register_forward_pre_hook(_store_input(store, "final_in"))]
        if pool is not None:
            hs.append(pool.register_forward_pre_hook(_store_input(store, "pool_in")))
            hs.append(pool.register_forward_hook(_store_output(store, "pool_out")))
            if pool.mlp is not None:
                hs.append(pool.mlp.register_forward_hook(_store_output(store, "pool_mlp")))
        else:
            hs.append(m.fc_norm.register_forward_pre_hook(_store_input(store, "pool_out")))
        return hs

    def finalize(store, convention, first_level) -> ReadoutMaps:
        x = store["final_in"]
        dt = x.dtype if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        mu, sigma = ln_stats(x, final)                                           # [B, N, 1]
        B, Ntok, D = x.shape
        if pool is None:
            n = Ntok - start
            w = torch.zeros(B, 1, Ntok, dtype=dt, device=x.device)
            w[:, 0, start:] = 1.0 / (n * sigma[:, start:, 0])
            offset = norm_offset(final, (mu / sigma)[:, start:], convention).mean(1)

            def lin(level, P):
                return norm_linear(final, P[:, :, 0], convention)
            return ReadoutMaps({0: w}, lin, offset, store["pool_out"].to(dt), post=post)

        H, dh = pool.num_heads, pool.head_dim
        y = store["pool_in"].to(dt)                                              # = norm(x), [B, N, D]
        q = torch.nn.functional.linear(pool.latent.to(dt), pool.q.weight.to(dt), _b(pool.q, dt)).reshape(1, H, dh)                                                  # latent_len == 1
        w_kv = pool.kv.weight.to(dt)
        b_kv = _b(pool.kv, dt) if pool.kv.bias is not None else torch.zeros(2 * D, dtype=dt, device=x.device)
        k = (y @ w_kv[:D].T + b_kv[:D]).view(B, Ntok, H, dh)
        alpha = torch.einsum("hd,bnhd->bhn", q[0], k).mul(pool.scale).softmax(-1)  # [B, H, N]
        w = alpha / sigma[:, None, :, 0]                                         # [B, H, N]
        w_v = w_kv[D:].view(H, dh, D)
        b_v = b_kv[D:].view(H, dh)
        w_o = pool.proj.weight.to(dt).view(D, H, dh)

        def lin(level, P):                                                       # P [B, K, H, D]
            v = torch.einsum("bkhe,hde->bkhd", norm_linear(final, P, convention), w_v)
            return torch.einsum("bkhd,ehd->bke", v, w_o)

        o_n = norm_offset(final, mu / sigma, convention)                         # [B, N, D] per-token offset
        o_pool = torch.einsum("bhn,bne->bhe", alpha, o_n)                        # Σ α = 1 per head
        v_off = torch.einsum("bhe,hde->bhd", o_pool, w_v) + b_v
        offset = torch.einsum("bhd,ehd->be", v_off, w_o) + (_b(pool.proj, dt) if pool.proj.bias is not None else 0.0)
        ex = {"attn_pool.mlp": store["pool_mlp"][:, 0].to(dt)} if pool.mlp is not None else {}
        return ReadoutMaps({0: w}, lin, offset, store["pool_out"].to(dt), extra=ex, post=post)

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed"))]

    def grids(hw):
        return {0: grid(hw)}

    return SpatialPlan(
        family="timm-vit-map" if pool is not None else "timm-vit-gap", root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks, finalize=finalize, grids=grids,
        num_prefix_tokens=npt, extra_components=extra)


def _b(lin: nn.Linear, dt) -> Optional[Tensor]:
    return None if lin.bias is None else lin.bias.to(dt)


def _post_norm(path: str, mod: nn.Module):
    from .models import PostOp

    return PostOp(path, spec=rule_for("norm", path, mod)(mod))
