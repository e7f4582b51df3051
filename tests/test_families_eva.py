"""EVA-02 (rotary embeddings, SwiGLU, sub-LayerNorms): exactness and a hand-written head formula."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
VARIANTS = {
    "eva02_tiny": dict(),
    "sub_norms+layerscale": dict(scale_attn_inner=True, scale_mlp=True, init_values=0.3),
    "cls_token_pool": dict(global_pool="token", use_fc_norm=False, use_post_transformer_norm=True),
}


@functools.lru_cache(maxsize=None)
def eva(variant: str, dtype=torch.float32):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=3, img_size=56, **VARIANTS[variant])
    with torch.no_grad():                                # non-trivial norm affines, biases and gains
        for n, p in m.named_parameters():
            if "norm" in n or "gamma" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(dtype, size=(56, 56)):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eva_reconstruction(variant, dtype):
    m, x = eva(variant, dtype), images(dtype)
    with torch.inference_mode():
        z = m.forward_head(m.forward_features(x), pre_logits=True)
    name = "blocks.2.attn.head.1"
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[name] if heads else None)
            assert torch.equal(d.readout, z)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (variant, heads, convention, err)
            if heads:
                scale = float(z.norm(dim=-1).max())
                torch.testing.assert_close(d.tokens[name].sum(1), d[name], rtol=0, atol=TOL[dtype] * scale)
                assert max(d.diagnostics["head_sum_error"].values()) <= TOL[dtype]


def test_eva_heads_sum_to_attention_component():
    m, x = eva("sub_norms+layerscale", torch.float64), images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    for b in range(3):
        heads = [k for k, c in enumerate(on.components) if c.kind == "head" and c.block == b]
        torch.testing.assert_close(on.contributions[:, heads].sum(1), off[f"blocks.{b}.attn"], rtol=0, atol=1e-12)


def test_eva_head_against_hand_written_rotary_formula():
    """Head h of block b, mean-pooled readout: (1/P) Σ_q Σ_m softmax(R(q)·R(k))·v W_O,hᵀ ⊙ γ1 through fc_norm."""
    from timm.layers import apply_rot_embed_cat

    m, x = eva("sub_norms+layerscale", torch.float64), images(torch.float64)
    block, h = 1, 2
    blk = m.blocks[block]
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, a, kw: seen.update(x=a[0], rope=kw["rope"]), with_kwargs=True),
             m.blocks[-1].register_forward_hook(lambda mod, a, out: seen.__setitem__("last", out))]
    with torch.inference_mode():
        m.forward_features(x)
    for hk in hooks:
        hk.remove()
    a = blk.attn
    with torch.inference_mode():
        y = blk.norm1(seen["x"])
        D, H = y.shape[-1], a.num_heads
        dh = D // H
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
        qkv = y @ a.qkv.weight.T + bias
        q, k, v = (qkv[..., i * D + h * dh: i * D + (h + 1) * dh] for i in range(3))       # [B, N, dh]
        q = torch.cat([q[:, :1], apply_rot_embed_cat(q[:, 1:], seen["rope"])], 1)
        k = torch.cat([k[:, :1], apply_rot_embed_cat(k[:, 1:], seen["rope"])], 1)
        att = torch.softmax(q @ k.transpose(1, 2) / dh ** 0.5, -1)                         # [B, N, N]
        o = att @ v                                                                       # [B, N, dh] head h
        # the attention sub-LayerNorm spans all heads: statistics from the real concatenated output
        full = torch.cat([torch.softmax(
            torch.cat([qq[:, :1], apply_rot_embed_cat(qq[:, 1:], seen["rope"])], 1)
            @ torch.cat([kk[:, :1], apply_rot_embed_cat(kk[:, 1:], seen["rope"])], 1).transpose(1, 2) / dh ** 0.5, -1)
            @ vv for qq, kk, vv in ((qkv[..., j * dh:(j + 1) * dh], qkv[..., D + j * dh:D + (j + 1) * dh],
                                     qkv[..., 2 * D + j * dh:2 * D + (j + 1) * dh]) for j in range(H))], -1)
        sigma = torch.sqrt(full.var(-1, unbiased=False, keepdim=True) + a.norm.eps)
        pad = torch.zeros_like(full)
        pad[..., h * dh:(h + 1) * dh] = o
        normed = a.norm.weight * (pad - pad.mean(-1, keepdim=True)) / sigma                 # head's share, β excluded
        u = (normed @ a.proj.weight.T * blk.gamma_1)[:, 1:].mean(1)                         # mean over patch queries
        stream = seen["last"][:, 1:].mean(1)
        fn = m.fc_norm
        expect = fn.weight * (u - u.mean(-1, keepdim=True)) / torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + fn.eps)
    d = vd.decompose(m, x)
    got = d[f"blocks.{block}.attn.head.{h}"]
    assert float(expect.norm()) > 1e-3 * float(d.readout.norm())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-11)


def test_eva_non_square_input():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, img_size=56,
                          dynamic_img_size=True).double().eval()
    x = images(torch.float64, (42, 70))
    name = "blocks.1.attn.head.0"
    d = vd.decompose(m, x, tokens=[name])
    assert float(d.residual().max()) <= 1e-10
    assert d.token_map(name).shape == (2, 3, 5, 192)
