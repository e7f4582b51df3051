"""timm LeViT (vitdecomp/engine/rules/levit.py): BatchNorm linears (``LinearNorm`` / ``ConvNorm``), an
activation before each attention's out-projection, ``LevitDownsample`` replacing the stream, mean readout;
linear (``levit_*``) and ``use_conv`` (``levit_conv_*``) variants, ``LevitDistilled`` and plain ``Levit``.

Readout equals timm's ``forward_head(forward_features(x), pre_logits=True)``; reconstruction ≤ 1e-5 (fp32)
/ ≤ 1e-10 (fp64) in both conventions, with and without heads; heads (+ the BatchNorm shift) sum to the
heads-off attention; token terms are refused; a downsample head recomputed from scratch (keys, values,
subsampled queries, attention biases, softmax, Hardswish, BatchNorm by hand), a block head, an MLP, ``embed``
and ``bias`` against hand-written formulas.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitdecomp as vd
from vitdecomp.errors import InputError, UnsupportedModuleError
from familyutil import run_with_io, upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 2))


@functools.lru_cache(maxsize=None)
def build(name: str = "levit_128s", dtype=torch.float64, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **{**SMALL, **kw})
    with torch.no_grad():   # timm inits every out-projection / MLP-out BatchNorm γ to 0 and the attention biases to 0
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.weight.copy_(1 + 0.3 * torch.randn_like(mod.weight))
                mod.bias.copy_(0.3 * torch.randn_like(mod.bias))
                mod.running_mean.copy_(0.2 * torch.randn_like(mod.running_mean))
                mod.running_var.copy_(0.5 + torch.rand_like(mod.running_var))
        for n, p in m.named_parameters():
            if "attention_biases" in n:
                p.copy_(torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def images(dtype, size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


NAMES = ["levit_128s", "levit_conv_128s"]
LAST = ["stages.2.downsample.attn_downsample", "stages.2.blocks.0.attn", "stages.2.blocks.1.attn"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES + ["levit_256d"])
def test_reconstruction_and_readout(name, dtype):
    m = build(name, dtype)
    x = images(dtype)
    z = upstream(m, x)
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention)
            assert torch.equal(d.readout, z), "readout differs from the upstream model's"
            err = float(d.residual().max())
            assert err <= TOL[dtype], (heads, convention, err)
    assert [c.name for c in d.components] == ["embed", LAST[0], "stages.2.downsample.mlp", LAST[1],
                                              "stages.2.blocks.0.mlp", LAST[2], "stages.2.blocks.1.mlp", "bias"]
    assert all(float(d[c].norm()) > 1e-3 * float(z.norm()) for c in d.names if c not in ("embed", "bias"))


@pytest.mark.parametrize("name", NAMES)
def test_heads_sum_to_attention_component(name):
    m = build(name)
    x = images(torch.float64)
    for convention in ("uniform", "centered"):
        on, off = vd.decompose(m, x, convention=convention), vd.decompose(m, x, heads=False, convention=convention)
        moved = torch.zeros_like(on.readout)
        for p, H in zip(LAST, (2, 4, 4)):      # the downsample has in_dim // key_dim = 48 // 8 = 6 heads
            idx = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == p]
            assert len(idx) == (6 if p == LAST[0] else H)
            heads = on.contributions[:, idx].sum(1)
            if convention == "uniform":        # the BatchNorm shift is split evenly over the heads
                torch.testing.assert_close(heads, off[p], rtol=0, atol=1e-12)
            moved = moved + off[p] - heads
        if convention == "centered":           # the BatchNorm shifts move to `bias`
            torch.testing.assert_close(moved, on["bias"] - off["bias"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_tokens_refused(name):
    m = build(name, torch.float32)
    with pytest.raises(UnsupportedModuleError,
                       match=r"stages\.2\.blocks\.1\.attn: per-token contributions .*Hardswish"):
        vd.decompose(m, images(torch.float32), tokens=["stages.2.blocks.1.attn.head.0"])
    with pytest.raises(UnsupportedModuleError, match="per-token"):
        vd.decompose(m, images(torch.float32), tokens=["stages.2.downsample.attn_downsample.head.5"])


def test_blocks_option_input_size_and_one_stage():
    m = build()
    x = images(torch.float64)
    d = vd.decompose(m, x, blocks=[-1])
    assert float(d.residual().max()) <= 1e-10
    assert {c.block for c in d.components if c.block is not None} == {2}      # 0: downsample, 1, 2: blocks
    seen = run_with_io(m, x, {"b1": m.stages[2].blocks[1]})
    torch.testing.assert_close(d["embed"], seen["b1.in"].mean(1), rtol=0, atol=1e-12)   # stream entering blocks.1
    assert vd.decompose(m, x, blocks="stages.2.blocks.0").names[1] == "stages.2.blocks.0.attn.head.0"
    with pytest.raises(InputError, match=r"expects \(64, 64\)"):
        vd.decompose(m, images(torch.float64, 48))
    one = build("levit_128s", torch.float64, embed_dim=(32,), num_heads=(2,), depth=(2,))   # no downsample
    d = vd.decompose(one, x)
    assert float(d.residual().max()) <= 1e-10 and d.names[1] == "stages.0.blocks.0.attn.head.0"
    seen = run_with_io(one, x, {"b0": one.stages[0].blocks[0]})
    torch.testing.assert_close(d["embed"], seen["b0.in"].mean(1), rtol=0, atol=1e-12)   # the stem's tokens


# ------------------------------------------------------------------------------------ by hand
def _bn(bn, y):
    """BatchNorm in eval on the last dim, by hand."""
    return (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _scale(bn):
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _shift(bn):
    return bn.bias - bn.running_mean * _scale(bn)


def _w(ln):
    return ln.linear.weight.reshape(ln.linear.weight.shape[0], -1)


def _tokens(t):
    """``[B, N, C]`` or ``[B, C, H, W]`` → ``[B, N, C]``."""
    return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h", [0, 5])
def test_downsample_head_from_scratch(name, h):
    """Head h of the last ``AttentionDownsample``: keys/values from its input, queries from the stride-2
    subsampled input, ``softmax(q·k/√dk + attention bias)``, values, Hardswish, then that head's slice of
    ``proj.ln`` (Linear/1×1 conv × BatchNorm γ/√(var+eps)), mean over the query positions."""
    m = build(name)
    x = images(torch.float64)
    a = m.stages[2].downsample.attn_downsample
    seen = run_with_io(m, x, {"ad": a})
    u = _tokens(seen["ad.in"])                                                # [B, 64, 48] on the 8×8 grid
    B, N, C = u.shape
    H, dk, dv = a.num_heads, a.key_dim, a.val_dim
    kv = _bn(a.kv.bn, u @ _w(a.kv).T).view(B, N, H, dk + dv)
    k, v = kv[..., :dk], kv[..., dk:]                                         # [B, N, H, ·]
    r = a.resolution
    sub = u.view(B, r[0], r[1], C)[:, ::a.stride, ::a.stride].reshape(B, -1, C)
    q = _bn(a.q.ln.bn, sub @ _w(a.q.ln).T).view(B, -1, H, dk)
    logits = torch.einsum("bqd,bnd->bqn", q[:, :, h], k[:, :, h]) * dk ** -0.5
    logits = logits + a.attention_biases[h][a.attention_bias_idxs]            # relative position bias [Nq, N]
    o = torch.einsum("bqn,bnd->bqd", logits.softmax(-1), v[:, :, h])         # [B, Nq, dv]
    w = _w(a.proj.ln)[:, h * dv:(h + 1) * dv]
    expect = (F.hardswish(o) @ w.T * _scale(a.proj.ln.bn)).mean(1)
    d = vd.decompose(m, x)
    got = d[f"stages.2.downsample.attn_downsample.head.{h}"]
    assert float(expect.norm()) > 1e-3 * float(d.readout.norm())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_block_head_mlp_embed_and_bias_by_hand(name):
    """A block head from its activation output (``proj.ln``'s input); every MLP = its pooled output;
    ``embed`` = 0 (the last downsample replaces the stream); ``bias`` = Σ attention BatchNorm shifts."""
    m = build(name)
    x = images(torch.float64)
    st = m.stages[2]
    attns = {"ad": st.downsample.attn_downsample, "a0": st.blocks[0].attn, "a1": st.blocks[1].attn}
    mlps = {"stages.2.downsample.mlp": st.downsample.mlp, "stages.2.blocks.0.mlp": st.blocks[0].mlp,
            "stages.2.blocks.1.mlp": st.blocks[1].mlp}
    seen = run_with_io(m, x, {"ln": st.blocks[1].attn.proj.ln, **mlps})
    d = vd.decompose(m, x)
    a, h = st.blocks[1].attn, 2
    dv = a.val_dim
    act = _tokens(seen["ln.in"])
    expect = (act[..., h * dv:(h + 1) * dv] @ _w(a.proj.ln)[:, h * dv:(h + 1) * dv].T * _scale(a.proj.ln.bn)).mean(1)
    torch.testing.assert_close(d[f"stages.2.blocks.1.attn.head.{h}"], expect, rtol=0, atol=1e-11)
    for path in mlps:
        torch.testing.assert_close(d[path], _tokens(seen[path + ".out"]).mean(1), rtol=0, atol=1e-11)
    assert torch.equal(d["embed"], torch.zeros_like(d["embed"]))
    bias = sum(_shift(t.proj.ln.bn) for t in attns.values()).expand_as(d["bias"])
    torch.testing.assert_close(d["bias"], bias, rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------ refused
def test_refused_variants():
    m = build("levit_128s", torch.float32, global_pool="")
    with pytest.raises(UnsupportedModuleError, match="global_pool=''"):
        vd.components_for(m)
    import copy

    m = copy.deepcopy(build("levit_128s", torch.float32))
    m.stages[2].blocks[0].attn.proj.ln.bn = nn.BatchNorm1d(64, track_running_stats=False).eval()
    with pytest.raises(UnsupportedModuleError, match=r"stages\.2\.blocks\.0\.attn\.proj\.ln\.bn: .*running statistics"):
        vd.decompose(m, images(torch.float32))
    m = copy.deepcopy(build("levit_128s", torch.float32))
    m.stages[2].blocks[1].attn.proj.act = nn.Softmax(-1)            # not element-wise: heads would mix
    with pytest.raises(UnsupportedModuleError, match=r"stages\.2\.blocks\.1\.attn\.proj\.act: .*element-wise"):
        vd.decompose(m, images(torch.float32))
