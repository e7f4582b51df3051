"""Perception Encoder (timm ``vit_pe_*``: EVA blocks with ``AttentionRope``, rotary embeddings, a
pre-transformer norm): the core towers' attention-pool (MAP) head is a per-position readout, the
lang/spatial towers mean-pool. Exactness, refusals and a hand-written MAP head formula."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(depth=2, embed_dim=48, num_heads=3)
VARIANTS = {
    # MAP head over every token (class token included), final norm, no fc_norm
    "core": ("vit_pe_core_tiny_patch16_384", dict(SMALL, img_size=64)),
    "core_layerscale": ("vit_pe_core_tiny_patch16_384", dict(SMALL, img_size=64, init_values=0.3)),
    # mean pool of the patch tokens, no final norm, layer scale
    "lang": ("vit_pe_lang_large_patch14_448", dict(SMALL, img_size=56)),
    "lang_no_cls": ("vit_pe_lang_gigantic_patch14_448", dict(SMALL, img_size=56, mlp_ratio=4.0)),
    # attention sub-norm (scale_norm) with a static readout; grouped-query K/V heads swapped in below
    "spatial_subnorm_gqa": ("vit_pe_spatial_tiny_patch16_512", dict(SMALL, num_heads=4, img_size=64,
                                                                    scale_attn_inner=True)),
}


def _gqa(m: nn.Module) -> None:
    """Replace every block's attention by a grouped-query ``AttentionRope`` (2 K/V heads for 4 query
    heads, separate projections, q/k norms): timm's Eva builder does not expose ``num_kv_heads``."""
    from timm.layers.attention import AttentionRope

    for blk in m.blocks:
        old = blk.attn
        blk.attn = AttentionRope(m.embed_dim, num_heads=4, qkv_fused=False, num_kv_heads=2, qk_norm=True,
                                 scale_norm=True, norm_layer=nn.LayerNorm, num_prefix_tokens=old.num_prefix_tokens)


@functools.lru_cache(maxsize=None)
def pe(variant: str, dtype=torch.float32):
    import timm

    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw)
    if variant.endswith("gqa"):
        _gqa(m)
    with torch.no_grad():                                # non-trivial norm affines, biases, gains, latent
        for n, p in m.named_parameters():
            if "norm" in n or "gamma" in n or "bias" in n or "latent" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(m, dtype):
    size = m.patch_embed.img_size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pe_exact(variant, dtype):
    """Readout is upstream's, reconstruction within tolerance (both conventions, heads on/off), heads
    sum to the heads-off attention, tokens sum to their head."""
    m = pe(variant, dtype)
    x = images(m, dtype)
    z = upstream(m, x)
    scale = float(z.norm(dim=-1).max())
    name = "blocks.1.attn.head.1"
    for convention in ("centered", "uniform"):
        on = vd.decompose(m, x, heads=True, convention=convention, tokens=[name])
        off = vd.decompose(m, x, heads=False, convention=convention)
        for d in (on, off):
            assert torch.equal(d.readout, z)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (variant, convention, err)
        torch.testing.assert_close(on.tokens[name].sum(1), on[name], rtol=0, atol=TOL[dtype] * scale)
        if convention == "uniform":                      # heads carry their share of the proj bias
            for b in range(2):
                idx = [k for k, c in enumerate(on.components) if c.kind == "head" and c.block == b]
                torch.testing.assert_close(on.contributions[:, idx].sum(1), off[f"blocks.{b}.attn"],
                                           rtol=0, atol=TOL[dtype] * scale)


def test_pe_core_is_a_per_position_readout_with_the_pool_mlp():
    m = pe("core", torch.float64)
    d = vd.decompose(m, images(m, torch.float64))
    assert "attn_pool.mlp" in d.names
    assert float(d["attn_pool.mlp"].norm()) > 0


def test_pe_core_head_against_hand_written_map_formula():
    """Head h of the last block through the final LayerNorm (frozen per-token σ) and the pool's
    attention (frozen latent-query probabilities over every token, class token included), from
    hook-captured inputs and the module weights (centered convention: biases excluded)."""
    m = pe("core_layerscale", torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[1], 2
    a, ap = blk.attn, m.attn_pool
    seen = {}
    hooks = [a.proj.register_forward_pre_hook(lambda _, args: seen.__setitem__("o", args[0])),
             m.norm.register_forward_pre_hook(lambda _, args: seen.__setitem__("x", args[0])),
             ap.register_forward_pre_hook(lambda _, args: seen.__setitem__("y", args[0]))]
    with torch.inference_mode():
        upstream(m, x)
        for hk in hooks:
            hk.remove()
        D, H = m.embed_dim, a.num_heads
        dh = D // H
        u = seen["o"][..., h * dh:(h + 1) * dh] @ a.proj.weight[:, h * dh:(h + 1) * dh].T * blk.gamma_1  # [B, N, D]
        xs = seen["x"]
        sigma = torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + m.norm.eps)
        un = m.norm.weight * (u - u.mean(-1, keepdim=True)) / sigma
        y = seen["y"]                                                     # the real pool input (= norm(x))
        B, N, _ = y.shape
        Hp, dp = ap.num_heads, ap.head_dim
        q = ap.q(ap.latent).reshape(Hp, dp)                               # one latent query
        k = (y @ ap.kv.weight[:D].T + ap.kv.bias[:D]).reshape(B, N, Hp, dp)
        alpha = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) * dp ** -0.5, -1)
        v = (un @ ap.kv.weight[D:].T).reshape(B, N, Hp, dp)               # value rows, no bias
        o = torch.einsum("bhn,bnhd->bhd", alpha, v).reshape(B, D)
        expect = o @ ap.proj.weight.T                                     # fc_norm is Identity in PE core
    assert isinstance(m.fc_norm, nn.Identity)
    got = vd.decompose(m, x)[f"blocks.1.attn.head.{h}"]
    assert float(expect.norm(dim=-1).min()) > 1e-6 * float(upstream(m, x).norm(dim=-1).max())   # not vacuous
    err = float(((got - expect).norm(dim=-1) / expect.norm(dim=-1)).max())  # relative to the head itself
    assert err <= 1e-9, err


def test_pe_gqa_tokens_against_hand_written_rope_formula():
    """Grouped-query attention: head h's tokens (mean-pooled readout, no final norm) use K/V head
    h // 2, after q/k norms and the rotary embedding, exactly as timm computes them."""
    from timm.layers import apply_rot_embed_cat

    m = pe.__wrapped__("spatial_subnorm_gqa", torch.float64)   # a fresh build: it is changed below
    m.blocks[1].attn.norm = nn.Identity()                 # a plain out-projection for the hand formula
    x = images(m, torch.float64)
    blk, h = m.blocks[1], 2                               # K/V head 1 (h % 2 would be 0)
    a = blk.attn
    seen = {}
    hk = blk.register_forward_pre_hook(lambda _, args, kw: seen.update(x=args[0], rope=kw["rope"]), with_kwargs=True)
    with torch.inference_mode():
        upstream(m, x)
        hk.remove()
        y = blk.norm1(seen["x"])
        dh, g = a.head_dim, h // a.num_kv_groups
        q = a.q_norm(a.q_proj(y)[..., h * dh:(h + 1) * dh])
        k = a.k_norm(a.k_proj(y)[..., g * dh:(g + 1) * dh])
        v = a.v_proj(y)[..., g * dh:(g + 1) * dh]
        npt = a.num_prefix_tokens
        q = torch.cat([q[:, :npt], apply_rot_embed_cat(q[:, npt:], seen["rope"])], 1)
        k = torch.cat([k[:, :npt], apply_rot_embed_cat(k[:, npt:], seen["rope"])], 1)
        att = torch.softmax(q @ k.transpose(1, 2) * dh ** -0.5, -1)[:, npt:].mean(1)     # [B, N] mean over patches
        expect = (att[..., None] * v) @ a.proj.weight[:, h * dh:(h + 1) * dh].T       # [B, N, D]
    assert blk.gamma_1 is None                            # no layer scale in PE spatial
    name = f"blocks.1.attn.head.{h}"
    d = vd.decompose(m, x, tokens=[name])
    assert isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)
    torch.testing.assert_close(d.tokens[name], expect, rtol=0, atol=1e-11)
    assert float(d.residual().max()) <= 1e-10


@pytest.mark.parametrize("change, match", [
    (lambda m: setattr(m.attn_pool, "q_norm", nn.LayerNorm(m.attn_pool.head_dim)), "q/k norms"),
    (lambda m: setattr(m.attn_pool, "pos_embed", nn.Parameter(torch.zeros(4, m.embed_dim))), "position embedding"),
    (lambda m: setattr(m.blocks[0].attn, "gate", nn.Linear(m.embed_dim, m.embed_dim)), "gated"),
    (lambda m: setattr(m.blocks[0].attn, "norm", nn.LayerNorm(m.embed_dim)), "sub-norm"),
], ids=["pool_qk_norm", "pool_pos_embed", "gated_attention", "attn_subnorm_with_map"])
def test_pe_refuses_what_is_not_linear(change, match):
    import timm

    name, kw = VARIANTS["core"]
    m = timm.create_model(name, pretrained=False, **kw).eval()
    change(m)
    with pytest.raises(UnsupportedModuleError, match=match):
        vd.decompose(m, images(m, torch.float32))
