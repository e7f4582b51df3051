"""timm PiT (vitdecomp/engine/rules/pit.py): timm ``Block``\\ s in pooling stages; the class-token stream
passes through each stage's ``pool.fc``; the readout is the normed class token (distilled: the mean of
the normed class and distillation tokens).

Readout equals timm's ``forward_head(forward_features(x), pre_logits=True)``; reconstruction ≤ 1e-5
(fp32) / ≤ 1e-10 (fp64) in both conventions, with and without heads; heads sum to the heads-off
attention; tokens sum to their head; a first-stage head recomputed from scratch (q, k, v, softmax of the
class-token query rows) carried by hand through both ``fc``\\ s and the final norm, an MLP, ``embed`` and
``bias`` against hand-written formulas.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError
from familyutil import ln_lin, run_with_io, upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(img_size=64, base_dims=(8, 8, 8), depth=(1, 1, 2), heads=(2, 4, 8))
NAMES = ["pit_ti_224", "pit_ti_distilled_224"]


@functools.lru_cache(maxsize=None)
def build(name: str, dtype=torch.float64, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **{**SMALL, **kw})
    with torch.no_grad():        # non-trivial norm affines and biases (timm inits them to 1 and 0)
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def images(dtype, size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


BLOCKS = ["transformers.0.blocks.0", "transformers.1.blocks.0", "transformers.2.blocks.0", "transformers.2.blocks.1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_readout_heads_and_tokens(name, dtype):
    m = build(name, dtype)
    x = images(dtype)
    z = upstream(m, x)
    scale = float(z.norm(dim=-1).max())
    first = "transformers.0.blocks.0.attn.head.1"
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[first] if heads else None)
            assert torch.equal(d.readout, z), "readout differs from the upstream model's"
            err = float(d.residual().max())
            assert err <= TOL[dtype], (heads, convention, err)
            if heads:
                T = m.cls_token.shape[1]
                assert d.tokens[first].shape[1] == T                 # one term per class-token position
                torch.testing.assert_close(d.tokens[first].sum(1), d[first], rtol=0, atol=TOL[dtype] * scale)
                assert float(d[first].norm()) > 1e-4 * scale
    want = ["embed"] + [f"{b}.{k}" for b in BLOCKS for k in ("attn", "mlp")] + ["bias"]
    assert [c.name for c in d.components] == want


@pytest.mark.parametrize("name", NAMES)
def test_heads_sum_to_attention_component(name):
    m = build(name)
    x = images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    for b, H in zip(BLOCKS, (2, 4, 8, 8)):
        p = f"{b}.attn"
        idx = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == p]
        assert len(idx) == H
        torch.testing.assert_close(on.contributions[:, idx].sum(1), off[p], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ by hand
def _to_readout(m, seen, u, stage):
    """Class-token terms ``u [B, T, D_stage]`` added in ``stage``, carried by hand through every later
    ``pool.fc`` (weight only), the final norm per token (centered) and the readout's token mean."""
    for s in range(stage + 1, len(m.transformers)):
        u = u @ m.transformers[s].pool.fc.weight.T
    y = ln_lin(m.norm, u, seen["norm.in"])
    return y[:, :2].mean(1) if m.head_dist is not None else y[:, 0]


def _mods(m):
    mods = {"norm": m.norm}
    for b in BLOCKS:
        blk = m.get_submodule(b)
        mods.update({f"{b}.n1": blk.norm1, f"{b}.mlp": blk.mlp})
    return mods


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h", [0, 1])
def test_first_stage_head_from_scratch(name, h):
    """Head h of ``transformers.0.blocks.0``: softmax(q_t·k/√dh) v over [class token(s), patches] (the
    block's norm1 output) for each class-token query t, × W_O,h, then fc_1, fc_2 and the final norm."""
    m = build(name)
    x = images(torch.float64)
    seen = run_with_io(m, x, _mods(m))
    a = m.transformers[0].blocks[0].attn
    y = seen["transformers.0.blocks.0.n1.out"]                               # [B, T + HW, D]
    B, N, D = y.shape
    H, dh, T = a.num_heads, a.head_dim, m.cls_token.shape[1]
    q, k, v = (y @ a.qkv.weight.T + a.qkv.bias).view(B, N, 3, H, dh)[:, :, :, h].unbind(2)
    attn = (q[:, :T] @ k.transpose(1, 2) * dh ** -0.5).softmax(-1)          # [B, T, N]: the class-token rows
    c = (attn @ v) @ a.proj.weight[:, h * dh:(h + 1) * dh].T                # [B, T, D]
    expect = _to_readout(m, seen, c, 0)
    d = vd.decompose(m, x)
    assert float(expect.norm()) > 1e-4 * float(d.readout.norm())
    torch.testing.assert_close(d[f"transformers.0.blocks.0.attn.head.{h}"], expect, rtol=0, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_mlp_embed_and_bias_by_hand(name):
    """MLPs: their output at the class-token positions; embed: the learned class token(s) through both
    fc's; bias: the final β + every out-projection bias and every fc bias, carried by hand."""
    m = build(name)
    x = images(torch.float64)
    seen = run_with_io(m, x, _mods(m))
    d = vd.decompose(m, x)
    T, B = m.cls_token.shape[1], x.shape[0]
    bias = m.norm.bias.expand(B, -1)
    for b in BLOCKS:
        s = int(b.split(".")[1])
        blk = m.get_submodule(b)
        mlp = _to_readout(m, seen, seen[f"{b}.mlp.out"][:, :T], s)
        torch.testing.assert_close(d[f"{b}.mlp"], mlp, rtol=0, atol=1e-11)
        bias = bias + _to_readout(m, seen, blk.attn.proj.bias.expand(B, T, -1), s)
    for s in (1, 2):
        bias = bias + _to_readout(m, seen, m.transformers[s].pool.fc.bias.expand(B, T, -1), s)
    torch.testing.assert_close(d["embed"], _to_readout(m, seen, m.cls_token.expand(B, -1, -1), 0), rtol=0, atol=1e-11)
    torch.testing.assert_close(d["bias"], bias, rtol=0, atol=1e-11)
    # from the first block of stage 1 on: embed is the class-token stream entering it (fc_1's bias inside)
    d1 = vd.decompose(m, x, blocks="transformers.1.blocks.0")
    assert float(d1.residual().max()) <= 1e-10
    got = run_with_io(m, x, {"b": m.transformers[1].blocks[0], "norm": m.norm})
    torch.testing.assert_close(d1["embed"], _to_readout(m, got, got["b.in"][:, :T], 1), rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------------ refused
def test_refused_variants():
    m = build("pit_ti_224", torch.float32, global_pool="")
    with pytest.raises(UnsupportedModuleError, match="global_pool=''"):
        vd.components_for(m)
    m = copy.deepcopy(build("pit_ti_224", torch.float32))
    m.transformers[1].norm = nn.LayerNorm(32)
    with pytest.raises(UnsupportedModuleError, match=r"transformers\.1\.norm: LayerNorm"):
        vd.decompose(m, images(torch.float32))
