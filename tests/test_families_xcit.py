"""timm XCiT (vitdecomp/engine/rules/xcit.py): class-attention blocks whose ``norm2`` normalises the
class-token stream (``tokens_norm`` True and False), XCA blocks on the patch tokens (no direct effect).

Readout equals timm's ``forward_head(forward_features(x), pre_logits=True)``; reconstruction ≤ 1e-5
(fp32) / ≤ 1e-10 (fp64) in both conventions, with and without heads; heads sum to the heads-off
attention; tokens sum to their head; a class-attention head, an MLP, ``embed`` and ``bias`` against
hand-written formulas (module weights + hook-captured inputs, every frozen norm σ written by hand).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError
from familyutil import ln_lin, run_with_io, upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(depth=2, cls_attn_layers=2, embed_dim=48, num_heads=4, img_size=64)


@functools.lru_cache(maxsize=None)
def build(tokens_norm: bool, dtype=torch.float32, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("xcit_nano_12_p16_224", pretrained=False, tokens_norm=tokens_norm, **{**SMALL, **kw})
    with torch.no_grad():        # non-trivial norm affines, biases, LayerScales (timm inits them to 1, 0, eta)
        for n, p in m.named_parameters():
            if any(s in n for s in ("norm", "gamma", "bias")):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def images(dtype, size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


CASES = [pytest.param(tn, dt, id=f"tokens_norm={tn}-{tag}")
         for tn in (False, True) for dt, tag in ((torch.float32, "fp32"), (torch.float64, "fp64"))]


@pytest.mark.parametrize("tokens_norm,dtype", CASES)
def test_reconstruction_readout_heads_and_tokens(tokens_norm, dtype):
    m = build(tokens_norm, dtype)
    x = images(dtype)
    z = upstream(m, x)
    scale = float(z.norm(dim=-1).max())
    first = "cls_attn_blocks.0.attn.head.2"
    for heads, convention in ((True, "centered"), (True, "uniform"), (False, "centered"), (False, "uniform")):
        d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[first] if heads else None)
        assert torch.equal(d.readout, z), "readout differs from the upstream model's"
        err = float(d.residual().max())
        assert err <= TOL[dtype], (heads, convention, err)
        if heads:
            torch.testing.assert_close(d.tokens[first].sum(1), d[first], rtol=0, atol=TOL[dtype] * scale)
            assert float(d[first].norm()) > 1e-4 * scale
    assert [c.name for c in d.components] == ["embed", "cls_attn_blocks.0.attn", "cls_attn_blocks.0.mlp",
                                              "cls_attn_blocks.1.attn", "cls_attn_blocks.1.mlp", "bias"]


@pytest.mark.parametrize("tokens_norm", [False, True])
def test_heads_sum_to_attention_component(tokens_norm):
    m = build(tokens_norm, torch.float64)
    x = images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    for j in range(2):
        p = f"cls_attn_blocks.{j}.attn"
        idx = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == p]
        assert len(idx) == 4
        torch.testing.assert_close(on.contributions[:, idx].sum(1), off[p], rtol=0, atol=1e-12)


def test_blocks_option_and_other_input_size():
    m = build(True, torch.float64)
    x = images(torch.float64)
    d = vd.decompose(m, x, blocks=[-1])
    assert float(d.residual().max()) <= 1e-10
    assert {c.block for c in d.components if c.block is not None} == {1}
    x48 = images(torch.float64, 48)            # XCiT takes any size (Fourier position encoding, dynamic H, W)
    d = vd.decompose(m, x48, convention="uniform")
    assert torch.equal(d.readout, upstream(m, x48)) and float(d.residual().max()) <= 1e-10


# ------------------------------------------------------------------------------------ by hand
def _to_readout(m, seen, u, level):
    """A class-token term ``u [B, D]`` added before ``cls_attn_blocks.<level>.norm2`` (or after the last
    one, ``level = L``) carried by hand through every later ``norm2`` and the final norm (centered)."""
    L = len(m.cls_attn_blocks)
    for j in range(level, L):
        u = ln_lin(m.cls_attn_blocks[j].norm2, u, seen[f"n2.{j}.in"][:, 0])
    return ln_lin(m.norm, u, seen["norm.in"][:, 0])


def _modules(m):
    mods = {"norm": m.norm}
    for j, blk in enumerate(m.cls_attn_blocks):
        mods.update({f"n2.{j}": blk.norm2, f"attn.{j}": blk.attn, f"mlp.{j}": blk.mlp})
    return mods


@pytest.mark.parametrize("tokens_norm", [False, True])
@pytest.mark.parametrize("j", [0, 1])
def test_class_attention_head_by_hand(tokens_norm, j):
    """Head h of ``cls_attn_blocks.<j>``: softmax(q_cls·k/√dh) v over [class token, patches] (the block's
    norm1 output), × W_O,h × γ1, then n2_j, …, n2_{L-1} and the final norm at the class token."""
    m = build(tokens_norm, torch.float64)
    x = images(torch.float64)
    seen = run_with_io(m, x, _modules(m))
    blk, h = m.cls_attn_blocks[j], 2
    a = blk.attn
    y = seen[f"attn.{j}.in"]                                                  # norm1([x_cls, x_patches])
    D, H = y.shape[-1], a.num_heads
    dh = D // H
    sl = slice(h * dh, (h + 1) * dh)
    q, k, v = (y @ p.weight.T + p.bias for p in (a.q, a.k, a.v))
    attn = (q[:, :1, sl] @ k[..., sl].transpose(1, 2) * dh ** -0.5).softmax(-1)   # [B, 1, N]
    c = (attn @ v[..., sl])[:, 0] @ a.proj.weight[:, sl].T * blk.gamma1
    expect = _to_readout(m, seen, c, j)
    d = vd.decompose(m, x)
    assert float(expect.norm()) > 1e-4 * float(d.readout.norm())
    torch.testing.assert_close(d[f"cls_attn_blocks.{j}.attn.head.{h}"], expect, rtol=0, atol=1e-11)


@pytest.mark.parametrize("tokens_norm", [False, True])
def test_mlp_embed_and_bias_by_hand(tokens_norm):
    """MLP j: γ2 ⊙ mlp(n2_j(·)) enters after n2_j; embed: the learned class token before n2_0; bias: the
    out-projection biases (× γ1, before n2_j), every n2 β (after n2_j) and the final β."""
    m = build(tokens_norm, torch.float64)
    x = images(torch.float64)
    seen = run_with_io(m, x, _modules(m))
    d = vd.decompose(m, x)
    L = len(m.cls_attn_blocks)
    bias = m.norm.bias.expand(x.shape[0], -1)
    for j, blk in enumerate(m.cls_attn_blocks):
        mlp = seen[f"mlp.{j}.out"][:, 0] * blk.gamma2
        torch.testing.assert_close(d[f"cls_attn_blocks.{j}.mlp"], _to_readout(m, seen, mlp, j + 1), rtol=0, atol=1e-11)
        bias = bias + _to_readout(m, seen, (blk.attn.proj.bias * blk.gamma1).expand(x.shape[0], -1), j)
        bias = bias + _to_readout(m, seen, blk.norm2.bias.expand(x.shape[0], -1), j + 1)
    embed = _to_readout(m, seen, m.cls_token[:, 0].expand(x.shape[0], -1), 0)
    torch.testing.assert_close(d["embed"], embed, rtol=0, atol=1e-11)
    torch.testing.assert_close(d["bias"], bias, rtol=0, atol=1e-11)
    assert L == 2 and not any(c.name.startswith("blocks.") for c in d.components)   # XCA blocks: no direct effect


# ------------------------------------------------------------------------------------ refused
@pytest.mark.parametrize("kw,match", [(dict(global_pool="avg"), "global_pool='avg'"),
                                      (dict(global_pool=""), "global_pool=''"),
                                      (dict(cls_attn_layers=0), "cls_attn_blocks")])
def test_refused_variants(kw, match):
    m = build(False, torch.float32, **kw)
    with pytest.raises(UnsupportedModuleError, match=match):
        vd.decompose(m, images(torch.float32))
    with pytest.raises(UnsupportedModuleError, match=match):
        vd.components_for(m)
