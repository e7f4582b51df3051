"""SigLIP attention-pool (MAP) readout and per-token-norm mean-pool readout: exactness and a
hand-written formula for one head carried through the pool's frozen attention."""
from __future__ import annotations

import functools

import pytest
import torch

import vitdecomp as vd

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# the so150m MAP model has 4 register tokens and no class token; its pool sees the patch tokens only
MODELS = ["vit_base_patch16_siglip_224", "vit_base_patch16_siglip_gap_224", "vit_so150m_patch16_reg4_map_256"]


@functools.lru_cache(maxsize=None)
def siglip(name: str, dtype=torch.float32, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, embed_dim=64, depth=3, num_heads=4, img_size=64, **kw)
    with torch.no_grad():                               # non-trivial norm affines, biases and latent
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n or "latent" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(dtype, size=(64, 64)):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", MODELS)
def test_siglip_reconstruction(name, dtype):
    m, x = siglip(name, dtype), images(dtype)
    z = upstream(m, x)
    tok = "blocks.1.attn.head.1"
    scale = float(z.norm(dim=-1).max())
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[tok] if heads else None)
            assert torch.equal(d.readout, z), "readout must be the upstream output itself"
            err = float(d.residual().max())
            assert err <= TOL[dtype], (name, heads, convention, err)
            if heads:
                torch.testing.assert_close(d.tokens[tok].sum(1), d[tok], rtol=0, atol=TOL[dtype] * scale)
                assert d.token_map(tok).shape == (2, 4, 4, 64)
    if "gap" not in name:
        assert d.names[-2] == "attn_pool.mlp"


@pytest.mark.parametrize("name", MODELS)
def test_siglip_heads_sum_to_block(name):
    m, x = siglip(name, torch.float64), images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    for b in range(3):
        idx = [k for k, c in enumerate(on.components) if c.kind == "head" and c.block == b]
        torch.testing.assert_close(on.contributions[:, idx].sum(1), off[f"blocks.{b}.attn"], rtol=0, atol=1e-12)
    # centered: MLPs and embed do not depend on the granularity
    on, off = vd.decompose(m, x), vd.decompose(m, x, heads=False)
    for c in off.components:
        if c.kind in ("embed", "mlp"):
            torch.testing.assert_close(on[c.name], off[c.name], rtol=0, atol=1e-12)


def test_siglip_head_through_attention_pool_by_hand():
    """c = Σ_p W_O,p W_v,p γ⊙C(Σ_n α_p[n] u[n]/σ_n), u[n] = head h's output at token n (every query)."""
    m, x = siglip(MODELS[0], torch.float64), images(torch.float64)
    block, h = 1, 2
    blk, pool = m.blocks[block], m.attn_pool
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0])),
             m.norm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("last", a[0]))]
    with torch.inference_mode():
        m.forward_features(x)
    for hk in hooks:
        hk.remove()
    with torch.inference_mode():
        a = blk.attn
        y = blk.norm1(seen["x"])
        D, H = y.shape[-1], a.num_heads
        dh = D // H
        qkv = y @ a.qkv.weight.T + a.qkv.bias
        q, k, v = (qkv[..., i * D + h * dh:i * D + (h + 1) * dh] for i in range(3))
        u = torch.softmax(q @ k.transpose(1, 2) / dh ** 0.5, -1) @ v @ a.proj.weight[:, h * dh:(h + 1) * dh].T
        last, fn = seen["last"], m.norm
        mu, var = last.mean(-1, keepdim=True), last.var(-1, unbiased=False, keepdim=True)
        sig = torch.sqrt(var + fn.eps)
        normed = fn.weight * (last - mu) / sig + fn.bias                  # = the pool's input
        Hp, dp = pool.num_heads, pool.head_dim
        qp = (pool.latent[0, 0] @ pool.q.weight.T + pool.q.bias).view(Hp, dp)
        kp = (normed @ pool.kv.weight[:D].T + pool.kv.bias[:D]).view(*normed.shape[:2], Hp, dp)
        alpha = torch.softmax(torch.einsum("pd,bnpd->bpn", qp, kp) / dp ** 0.5, -1)   # [B, Hp, N]
        expect = 0
        for p in range(Hp):
            s = slice(p * dp, (p + 1) * dp)
            pooled = torch.einsum("bn,bne->be", alpha[:, p] / sig[..., 0], u)
            vp = (fn.weight * (pooled - pooled.mean(-1, keepdim=True))) @ pool.kv.weight[D:][s].T
            expect = expect + vp @ pool.proj.weight[:, s].T
    d = vd.decompose(m, x)
    got = d[f"blocks.{block}.attn.head.{h}"]
    assert float(expect.norm()) > 1e-3 * float(d.readout.norm())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-11)


def test_siglip_non_square_dynamic_size():
    m = siglip(MODELS[0], torch.float64, dynamic_img_size=True)
    x = images(torch.float64, (48, 80))
    tok = "blocks.2.attn.head.0"
    d = vd.decompose(m, x, tokens=[tok])
    assert torch.equal(d.readout, upstream(m, x))
    assert float(d.residual().max()) <= 1e-10
    assert d.token_map(tok).shape == (2, 3, 5, 64)
    # the token in row 1, column 3 is sequence position 1·5 + 3 (no prefix tokens)
    assert torch.equal(d.token_map(tok)[:, 1, 3], d.tokens[tok][:, 8])


def test_pool_heads_view_sums_to_the_readout():
    """Second view: z = Σ_p (pool head p's output) + b_O + attn_pool.mlp (fc_norm is the identity)."""
    m, x = siglip(MODELS[0], torch.float64), images(torch.float64)
    d = vd.decompose(m, x)
    assert d.pool_heads.shape == (2, 4, 64)
    recon = d.pool_heads.sum(1) + m.attn_pool.proj.bias + d["attn_pool.mlp"]
    torch.testing.assert_close(recon, d.readout, rtol=0, atol=1e-12)


def test_pool_view_components_are_the_pool_heads_and_mlp():
    """pool_view(): one component per pool head (hand-written from timm's own pool), the pool MLP and an
    input-independent bias — the attn_pool components of docs/method.md “The residual stream as a sum”."""
    m, x = siglip(MODELS[0], torch.float64), images(torch.float64)
    d = vd.decompose(m, x)
    v = d.pool_view()
    pool = m.attn_pool
    Hp, D = pool.num_heads, 64
    assert v.names == [f"attn_pool.head.{p}" for p in range(Hp)] + ["attn_pool.mlp", "bias"]
    torch.testing.assert_close(v.contributions.sum(1), d.readout, rtol=0, atol=1e-12)
    # bias is the same for every image (no input dependence hides in it)
    torch.testing.assert_close(v["bias"][0], v["bias"][1], rtol=0, atol=1e-12)
    torch.testing.assert_close(v["bias"][0], pool.proj.bias, rtol=0, atol=1e-12)   # fc_norm is the identity here
    # head p by hand: softmax(q_p k_pᵀ/√d) v_p W_O[:, p]ᵀ over the stream that enters the pool
    seen = {}
    h = pool.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    upstream(m, x)
    h.remove()
    t = seen["x"]
    dp = D // Hp
    with torch.no_grad():
        q = pool.q(pool.latent)[0, 0]
        kv = pool.kv(t)
        for p in range(Hp):
            s = slice(p * dp, (p + 1) * dp)
            a = torch.softmax(kv[..., :D][..., s] @ q[s] / dp ** 0.5, dim=-1)
            expect = torch.einsum("bn,bne->be", a, kv[..., D:][..., s]) @ pool.proj.weight[:, s].T
            torch.testing.assert_close(v[f"attn_pool.head.{p}"], expect, rtol=0, atol=1e-11)
    from vitdecomp.errors import InputError

    with pytest.raises(InputError, match="attention-pool"):
        vd.decompose(siglip(MODELS[1], torch.float64), x).pool_view()
