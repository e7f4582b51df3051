"""One head and one MLP per family against formulas written here from the weights (docs/method.md “The readout chain and frozen statistics”).

Nothing in this file uses the engine's rules: the block input and the last residual stream are
captured with plain forward hooks, and the head's readout-row attention, its value path, the
out-projection slice, LayerScale and the frozen final LayerNorm are spelled out by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from conftest import images_for, model

CASES = [  # (model, block, head)
    ("timm:deit_tiny_patch16_224", 7, 1),
    ("timm:vit_small_patch14_dinov2", 5, 4),
    ("timm:vit_small_patch14_reg4_dinov2", 10, 2),
    ("timm:vit_base_patch16_clip_224", 3, 11),
    ("open_clip:ViT-S-16", 4, 3),
]


def capture(lm, x, block: int):
    """Run the unmodified model once; return the input of ``block`` and the last block's output."""
    if lm.library == "timm":
        blocks = lm.model.blocks
    else:
        blocks = lm.model.visual.transformer.resblocks
    seen = {}
    h1 = blocks[block].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    h2 = blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("last", out.clone()))
    try:
        with torch.inference_mode():
            if lm.library == "timm":
                lm.model.forward_features(x)
            else:
                lm.model.encode_image(x)
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["last"]


def layer_norm_map(u, stream, norm):
    """γ ⊙ (u − mean u) / σ(stream) — LayerNorm with the real stream's frozen statistics."""
    var = stream.var(-1, unbiased=False, keepdim=True)
    return norm.weight * (u - u.mean(-1, keepdim=True)) / torch.sqrt(var + norm.eps)


def scale_of(ls):
    return ls.gamma if hasattr(ls, "gamma") else torch.ones(())


def timm_pieces(lm, blk):
    attn = blk.attn
    D = attn.qkv.in_features
    w_q, w_k, w_v = attn.qkv.weight.split(D)
    b_q, b_k, b_v = (attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(3 * D)).split(D)
    return dict(norm1=blk.norm1, norm2=blk.norm2, w=(w_q, w_k, w_v), b=(b_q, b_k, b_v),
                H=attn.num_heads, w_o=attn.proj.weight, ls1=scale_of(blk.ls1), ls2=scale_of(blk.ls2),
                attn=lambda y: blk.ls1(blk.attn(y)), mlp=blk.mlp, final=lm.model.norm, proj=None)


def open_clip_pieces(lm, blk):
    mha = blk.attn
    D = mha.embed_dim
    return dict(norm1=blk.ln_1, norm2=blk.ln_2, w=mha.in_proj_weight.split(D), b=mha.in_proj_bias.split(D),
                H=mha.num_heads, w_o=mha.out_proj.weight, ls1=scale_of(blk.ls_1), ls2=scale_of(blk.ls_2),
                attn=lambda y: blk.ls_1(mha(y, y, y, need_weights=False)[0]), mlp=blk.mlp,
                final=lm.model.visual.ln_post, proj=lm.model.visual.proj)


@pytest.mark.parametrize("name,block,head", CASES, ids=[c[0] for c in CASES])
def test_head_and_mlp_against_hand_written_formula(name, block, head):
    lm = model(name, torch.float64)
    x = images_for(lm, dtype=torch.float64)
    blk = (lm.model.blocks if lm.library == "timm" else lm.model.visual.transformer.resblocks)[block]
    p = timm_pieces(lm, blk) if lm.library == "timm" else open_clip_pieces(lm, blk)
    xin, last = capture(lm, x, block)
    stream = last[:, 0]                                   # every family here reads out the CLS token

    with torch.inference_mode():
        # --- head: the CLS query's attention row, its value path and W_O's column slice ---
        y = p["norm1"](xin)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = p["w"], p["b"]
        H = p["H"]
        hd = w_q.shape[0] // H
        sl = slice(head * hd, (head + 1) * hd)
        q = y[:, 0] @ w_q[sl].T + b_q[sl]                 # [B, hd]
        k = y @ w_k[sl].T + b_k[sl]                       # [B, N, hd]
        v = y @ w_v[sl].T + b_v[sl]
        a = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / hd ** 0.5, -1)
        u_head = torch.einsum("bn,bnd->bd", a, v) @ p["w_o"][:, sl].T * p["ls1"]
        expect_head = layer_norm_map(u_head, stream, p["final"])

        # --- MLP: its real output at CLS after the attention branch, times LayerScale ---
        mid = xin + p["attn"](y)
        u_mlp = p["mlp"](p["norm2"](mid))[:, 0] * p["ls2"]
        expect_mlp = layer_norm_map(u_mlp, stream, p["final"])
        if p["proj"] is not None:
            expect_head, expect_mlp = expect_head @ p["proj"], expect_mlp @ p["proj"]

    d = vd.decompose(lm, x)
    prefix = "blocks" if lm.library == "timm" else "transformer.resblocks"
    got_head = d[f"{prefix}.{block}.attn.head.{head}"]
    got_mlp = d[f"{prefix}.{block}.mlp"]
    scale = float(d.readout.norm(dim=-1).max())
    assert float(expect_head.norm()) > 1e-6 * scale, "degenerate test: the head contributes nothing"
    torch.testing.assert_close(got_head, expect_head, rtol=0, atol=1e-11 * scale)
    torch.testing.assert_close(got_mlp, expect_mlp, rtol=0, atol=1e-11 * scale)


def test_uniform_convention_formula_for_one_head():
    """Under ``uniform`` a head also carries 1/(K·H) of the final norm's mean and β and 1/H of b_O."""
    lm = model("timm:deit_tiny_patch16_224", torch.float64)
    x = images_for(lm, dtype=torch.float64)
    block, head = 2, 0
    blk = lm.model.blocks[block]
    p = timm_pieces(lm, blk)
    xin, last = capture(lm, x, block)
    stream = last[:, 0]
    with torch.inference_mode():
        y = p["norm1"](xin)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = p["w"], p["b"]
        H, hd = p["H"], w_q.shape[0] // p["H"]
        sl = slice(head * hd, (head + 1) * hd)
        a = torch.softmax(torch.einsum("bd,bnd->bn", y[:, 0] @ w_q[sl].T + b_q[sl], y @ w_k[sl].T + b_k[sl])
                          / hd ** 0.5, -1)
        u = torch.einsum("bn,bnd->bd", a, y @ w_v[sl].T + b_v[sl]) @ p["w_o"][:, sl].T + blk.attn.proj.bias / H
        L = len(lm.model.blocks)
        f = 1.0 / ((1 + 2 * L) * H)                      # slots: embed + L attention layers + L MLPs
        norm = p["final"]
        sigma = torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + norm.eps)
        mu = stream.mean(-1, keepdim=True)
        expect = norm.weight * (u - f * mu) / sigma + f * norm.bias
    d = vd.decompose(lm, x, convention="uniform")
    torch.testing.assert_close(d[f"blocks.{block}.attn.head.{head}"], expect, rtol=0, atol=1e-12)
    assert float(d["bias"].abs().max()) == 0.0


def test_token_contributions_are_attention_weighted_values():
    """Token m of a head = a[CLS, m] · v_m W_O,hᵀ through the frozen final norm; the map is in patch order."""
    lm = model("timm:deit_tiny_patch16_224", torch.float64)
    x = images_for(lm, dtype=torch.float64)
    block, head = 9, 2
    blk = lm.model.blocks[block]
    p = timm_pieces(lm, blk)
    xin, last = capture(lm, x, block)
    with torch.inference_mode():
        y = p["norm1"](xin)
        (w_q, w_k, w_v), (b_q, b_k, b_v) = p["w"], p["b"]
        hd = w_q.shape[0] // p["H"]
        sl = slice(head * hd, (head + 1) * hd)
        a = torch.softmax(torch.einsum("bd,bnd->bn", y[:, 0] @ w_q[sl].T + b_q[sl], y @ w_k[sl].T + b_k[sl])
                          / hd ** 0.5, -1)
        per_tok = (a[..., None] * (y @ w_v[sl].T + b_v[sl])) @ p["w_o"][:, sl].T        # [B, N, D]
        expect = layer_norm_map(per_tok, last[:, :1], p["final"])
    name = f"blocks.{block}.attn.head.{head}"
    d = vd.decompose(lm, x, tokens=[name])
    torch.testing.assert_close(d.tokens[name], expect, rtol=0, atol=1e-12)
    tm = d.token_map(name)                                                       # [B, 14, 14, D]
    assert torch.equal(tm[:, 3, 5], d.tokens[name][:, 1 + 3 * 14 + 5])   # row-major, CLS dropped
    assert F.cosine_similarity(d.tokens[name].sum(1), d[name], dim=-1).min() > 1 - 1e-12
