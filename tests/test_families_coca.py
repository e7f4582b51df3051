"""open_clip CoCa (``coca_model.CoCa``): a ViT tower read out through an ``AttentionalPooler`` (query 0 =
the contrastive token, then ``ln_post`` and ``proj``). The readout is ``encode_image`` itself (normalised
and not); decompositions are exact, heads sum to their layer, tokens to their head, and one pooler head and
one block head match hand formulas written from the upstream modules (``MultiheadAttention`` called with
``need_weights=True`` for the probabilities, no engine code).

Models are real open_clip CoCa architectures built small with config overrides (``load_model(name,
vision_cfg=…, text_cfg=…, multimodal_cfg=…)``): pool width 48 ≠ tower width 64 (the pooler's separate
``kdim``/``vdim`` projections), and a variant with equal widths (one packed in-projection).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ARCH = "open_clip:coca_ViT-B-32"


def overrides(embed_dim: int = 48, **vision) -> dict:
    import open_clip

    cfg = open_clip.get_model_config("coca_ViT-B-32")
    vc = {**cfg["vision_cfg"], "layers": 2, "width": 64, "head_width": 16, "image_size": 64, "patch_size": 16,
          "attn_pooler_heads": 4, "attn_pooler_queries": 5, **vision}
    tc = {**cfg["text_cfg"], "layers": 1, "width": 32, "heads": 2}
    mc = {**cfg["multimodal_cfg"], "layers": 1, "width": 32, "heads": 2}
    return dict(embed_dim=embed_dim, vision_cfg=vc, text_cfg=tc, multimodal_cfg=mc)


@functools.lru_cache(maxsize=None)
def coca(dtype=torch.float32, embed_dim: int = 48) -> vd.LoadedModel:
    lm = vd.load_model(ARCH, dtype=dtype, seed=0, **overrides(embed_dim))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                               # non-trivial norm affines and biases
        for n, p in lm.model.visual.named_parameters():
            if "ln" in n or "bias" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return lm


def images(lm, dtype, batch=2):
    return torch.randn(batch, 3, *lm.image_size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def encode_image(lm, x, normalize=False):
    with torch.inference_mode():
        return lm.model.encode_image(x, normalize=normalize)


@pytest.mark.parametrize("embed_dim", [48, 64], ids=["kdim", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_coca_reconstruction(dtype, embed_dim):
    lm = coca(dtype, embed_dim)
    assert lm.model.visual.attn_pool.attn._qkv_same_embed_dim == (embed_dim == 64)
    x = images(lm, dtype)
    z = encode_image(lm, x)
    assert lm.readout.dim == z.shape[-1] == embed_dim
    heads = [c.name for c in vd.components_for(lm) if c.kind == "head"]
    assert heads[0] == "transformer.resblocks.0.attn.head.0" and len(heads) == 2 * 4
    scale = float(z.norm(dim=-1).max())
    for convention in ("centered", "uniform"):
        d = vd.decompose(lm, x, convention=convention, tokens=[heads[-1]])
        assert torch.equal(d.readout, z), "readout must be encode_image itself"
        err = float(d.residual().max())
        assert err <= TOL[dtype], f"{convention}: relative error {err:.2e}"
        torch.testing.assert_close(d.contributions.sum(1), z, rtol=0, atol=TOL[dtype] * scale)
        torch.testing.assert_close(d.tokens[heads[-1]].sum(1), d[heads[-1]], rtol=0, atol=TOL[dtype] * scale)
        assert d.tokens[heads[-1]].shape[1] == 1 + 16, "class token + 4×4 patches"
    dn = vd.decompose(lm, x, normalize=True)
    torch.testing.assert_close(dn.readout, encode_image(lm, x, normalize=True), rtol=0, atol=TOL[dtype])
    assert float(dn.residual().max()) <= TOL[dtype]


def test_coca_heads_sum_to_layer():
    """Heads of each block sum to its heads-off attention (uniform); centered moves the out-projection
    biases from the heads to ``bias``."""
    lm = coca(torch.float64)
    x = images(lm, torch.float64)
    for convention in ("centered", "uniform"):
        on, off = (vd.decompose(lm, x, heads=h, convention=convention) for h in (True, False))
        attn = [c for c in off.components if c.kind == "attn"]
        assert len(attn) == 2
        moved = torch.zeros_like(off.readout)
        for c in attn:
            idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            assert len(idx) == 4, c.name
            heads_sum = on.contributions[:, idx].sum(1)
            if convention == "uniform":          # heads carry their share of the out-projection bias
                torch.testing.assert_close(heads_sum, off[c.name], rtol=0, atol=1e-12)
            moved = moved + off[c.name] - heads_sum
        if convention == "centered":             # split heads: the out-projection biases move to `bias`
            assert float(moved.abs().max()) > 1e-3
            torch.testing.assert_close(moved, on["bias"] - off["bias"], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ hand formulas
def _pooler_parts(lm, x):
    """From one real forward pass: the last stream ``x_L`` (the pooler's input), ``ln_post``'s input
    (query 0's pooled vector) and the pooler's attention probabilities of query 0 ``[B, H, N]`` (asked
    from the upstream ``MultiheadAttention`` with ``need_weights=True``)."""
    v = lm.model.visual
    pool = v.attn_pool
    got = {}
    hs = [pool.register_forward_pre_hook(lambda _, a: got.__setitem__("xL", a[0].detach().clone())),
          v.ln_post.register_forward_pre_hook(lambda _, a: got.__setitem__("post_in", a[0][:, 0].detach().clone()))]
    try:
        encode_image(lm, x)
    finally:
        for h in hs:
            h.remove()
    with torch.inference_mode():
        kx = pool.ln_k(got["xL"])
        q = pool.ln_q(pool.query)[None].expand(kx.shape[0], -1, -1)
        _, w = pool.attn(q, kx, kx, need_weights=True, average_attn_weights=False)
    return got["xL"], got["post_in"], w[:, :, 0]                                   # [B, H, N]


def _values(mha):
    """The pooler's value projection ``[E, C]`` and bias ``[E]``."""
    E = mha.embed_dim
    w_v = mha.in_proj_weight[2 * E:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    return w_v, mha.in_proj_bias[2 * E:]


def _post(v, u, post_in):
    """``ln_post`` on a pooled part ``u`` with the frozen statistics of the real pooled vector (centered
    convention, β excluded), then ``proj``."""
    n = v.ln_post
    sigma = torch.sqrt(post_in.var(-1, unbiased=False, keepdim=True) + n.eps)
    return (n.weight * (u - u.mean(-1, keepdim=True)) / sigma) @ v.proj


def test_pooler_head_against_hand_formula():
    """Pool view head ``p``: ``W_O,p Σ_n α_p[n] (W_v,p ln_k(x_L[n]) + b_v,p)`` through ``ln_post`` and ``proj``."""
    lm = coca(torch.float64)
    v, x = lm.model.visual, images(lm, torch.float64)
    xL, post_in, alpha = _pooler_parts(lm, x)
    mha = v.attn_pool.attn
    H, dh = mha.num_heads, mha.head_dim
    w_v, b_v = _values(mha)
    vals = v.attn_pool.ln_k(xL) @ w_v.T + b_v                                       # [B, N, E]
    view = vd.decompose(lm, x).pool_view()
    for p in (0, H - 1):
        sl = slice(p * dh, (p + 1) * dh)
        u = torch.einsum("bn,bnd->bd", alpha[:, p], vals[..., sl]) @ mha.out_proj.weight[:, sl].T
        torch.testing.assert_close(view[f"attn_pool.head.{p}"], _post(v, u, post_in), rtol=0, atol=1e-12)
    assert float(view.residual().max()) <= 1e-10


def test_block_head_against_hand_formula():
    """The last block's head 1: its per-position output (``softmax(q kᵀ/√dh) v`` from ``ln_1``'s output,
    times its slice of the out-projection) pooled by every pooler head with ``α_p[n]/σ_n`` (``ln_k``'s
    frozen σ, γ, centring), through the values, the out-projection, ``ln_post`` and ``proj``."""
    lm = coca(torch.float64)
    v, x = lm.model.visual, images(lm, torch.float64)
    blk = v.transformer.resblocks[-1]
    got = {}
    hd = blk.ln_1.register_forward_hook(lambda _, __, out: got.__setitem__("a", out.detach().clone()))
    try:
        xL, post_in, alpha = _pooler_parts(lm, x)
    finally:
        hd.remove()
    a, mha = got["a"], blk.attn
    B, N, D = a.shape
    h, H, dh = 1, mha.num_heads, mha.head_dim
    q, k, val = (t.reshape(B, N, H, dh)[:, :, h] for t in
                 torch.nn.functional.linear(a, mha.in_proj_weight, mha.in_proj_bias).split(D, -1))
    c = ((q @ k.transpose(-2, -1)) / dh ** 0.5).softmax(-1) @ val @ mha.out_proj.weight[:, h * dh:(h + 1) * dh].T
    ln_k, pm = v.attn_pool.ln_k, v.attn_pool.attn
    sigma = torch.sqrt(xL.var(-1, unbiased=False, keepdim=True) + ln_k.eps)
    cn = ln_k.weight * (c - c.mean(-1, keepdim=True)) / sigma                       # [B, N, D]
    w_v, _ = _values(pm)
    P, Hp = pm.head_dim, pm.num_heads
    u = sum(torch.einsum("bn,bnd->bd", alpha[:, p], cn @ w_v[p * P:(p + 1) * P].T)
            @ pm.out_proj.weight[:, p * P:(p + 1) * P].T for p in range(Hp))
    d = vd.decompose(lm, x)
    torch.testing.assert_close(d["transformer.resblocks.1.attn.head.1"], _post(v, u, post_in), rtol=0, atol=1e-12)


@pytest.mark.parametrize("vision, where", [
    (dict(attentional_pool="parallel"), "attn_pool_contrastive"),
    (dict(pool_type="avg"), "pool_type='avg'"),
])
def test_unsupported_poolers_are_refused(vision, where):
    lm = vd.load_model(ARCH, seed=0, **overrides(**vision))
    with pytest.raises(UnsupportedModuleError, match=where):
        vd.components_for(lm)
