"""Swin Transformer V2 (post-norm blocks, cosine window attention, reduce-then-norm patch merging):
exactness against the upstream readout, heads sum to the heads-off attention, tokens sum to the head,
and one head's token map against a hand-written construction (timm's own ``_attn`` restricted to the
head, the block's ``norm1`` with its real σ, merges and the final norm carried by hand)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from test_families_swin import TOKENS, check_reconstruction

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), window_size=2)


@functools.lru_cache(maxsize=None)
def swinv2(dtype=torch.float32, img_size=(64, 64)):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=img_size, **SMALL)
    with torch.no_grad():                       # non-trivial norm affines and biases (timm inits post-norms to 0)
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(dtype, size=(64, 64), seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.float64], ids=["fp32", "fp64"])
def test_swinv2_reconstruction(dtype):
    check_reconstruction(swinv2(dtype), images(dtype), dtype, grids=((16, 16), (4, 4)))


def test_swinv2_heads_sum_to_block():
    """uniform: a block's heads sum to its heads-off attention (the post-norm β split over the heads);
    centered: β goes to ``bias`` with heads on, so heads + bias match attention + bias."""
    m, x = swinv2(torch.float64), images(torch.float64)
    for convention in ("centered", "uniform"):
        on = vd.decompose(m, x, convention=convention)
        off = vd.decompose(m, x, heads=False, convention=convention)
        heads_total, attn_total = on["bias"], off["bias"]
        for c in off.components:
            if c.kind == "attn":
                idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
                assert len(idx) == m.get_submodule(c.path).num_heads
                hsum = on.contributions[:, idx].sum(1)
                if convention == "uniform":
                    torch.testing.assert_close(hsum, off[c.name], rtol=0, atol=1e-12)
                heads_total, attn_total = heads_total + hsum, attn_total + off[c.name]
            elif c.kind in ("embed", "mlp"):
                torch.testing.assert_close(on[c.name], off[c.name], rtol=0, atol=1e-12)
        torch.testing.assert_close(heads_total, attn_total, rtol=0, atol=1e-12)


def capture(m, x, block):
    seen = {}
    hs = [block.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0])),
          block.norm1.register_forward_pre_hook(lambda mod, a: seen.__setitem__("attn_out", a[0])),
          m.norm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("final", a[0]))]
    for s, st in enumerate(m.layers):
        if s > 0:
            hs.append(st.downsample.norm.register_forward_pre_hook(lambda mod, a, s=s: seen.__setitem__(s, a[0])))
    with torch.inference_mode():
        m.forward_features(x)
    for h in hs:
        h.remove()
    return seen


def sigma(t, eps):
    return torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)


def carry_by_hand(m, u, stage, seen):
    """Each position's term ``u [B, H, W, C]`` (stage ``stage``) carried separately to z: every later
    V2 patch merging (zero-padded slot, reduction, then centred, γ, real σ of the merged position) and
    the final LayerNorm (real σ of the final position) and the mean over final positions."""
    B, H, W, C = u.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    Y, X, t = ys.flatten(), xs.flatten(), u.reshape(B, H * W, C)
    for s in range(stage + 1, len(m.layers)):
        ds = m.layers[s].downsample
        slot = 2 * (X % 2) + (Y % 2)                          # timm's concat order: (x offset, y offset)
        Y, X = Y // 2, X // 2
        pad = t.new_zeros(B, H * W, 4 * C)
        for j in range(4):
            pad[:, slot == j, j * C:(j + 1) * C] = t[:, slot == j]
        r = pad @ ds.reduction.weight.T
        t = ds.norm.weight * (r - r.mean(-1, keepdim=True)) / sigma(seen[s], ds.norm.eps)[:, Y, X]
        C = t.shape[-1]
    fin = seen["final"]
    t = m.norm.weight * (t - t.mean(-1, keepdim=True)) / sigma(fin, m.norm.eps)[:, Y, X] / (fin.shape[1] * fin.shape[2])
    return t.view(B, H, W, -1)


@pytest.mark.parametrize("size", [(64, 64), (64, 48)], ids=["64", "64x48"])
@pytest.mark.parametrize("token", TOKENS)
def test_swinv2_token_map_against_hand_formula(token, size):
    """Head h's per-position output ``o_h W_O,hᵀ + b_O/H`` is produced by timm's own ``_attn`` (cyclic shift,
    window partition and reverse, inverse shift) with the out-projection restricted to that head, put
    through the block's post-norm with the real σ of the full attention output (``γ1 ⊙ C(·)/σ1``), then
    carried by hand; the engine's token map must match at every image position."""
    m = swinv2(torch.float64, size)
    x = images(torch.float64, size)
    path, h = token.rsplit(".attn.head.", 1)
    h = int(h)
    _, s, _, j = path.split(".")
    blk = m.layers[int(s)].blocks[int(j)]
    seen = capture(m, x, blk)
    H = blk.attn.num_heads
    dh = blk.attn.proj.in_features // H

    def only_head(mod, args, out):
        keep = torch.zeros_like(args[0])
        keep[..., h * dh:(h + 1) * dh] = args[0][..., h * dh:(h + 1) * dh]
        return F.linear(keep, mod.weight, mod.bias / H)     # this head's share of b_O

    hk = blk.attn.proj.register_forward_hook(only_head)
    try:
        with torch.inference_mode():
            u = blk._attn(seen["x"])                          # [B, H, W, C] in image coordinates
    finally:
        hk.remove()
    n1 = blk.norm1
    u = n1.weight * (u - u.mean(-1, keepdim=True)) / sigma(seen["attn_out"], n1.eps)
    if token == TOKENS[1]:
        assert any(blk.shift_size), "the test must cover a shifted-window block"
    expect = carry_by_hand(m, u, int(s), seen)
    d = vd.decompose(m, x, tokens=[token])
    got = d.token_map(token)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(expect.sum((1, 2)), d[token], rtol=0, atol=1e-12)
    assert not torch.allclose(torch.roll(expect, (3, 3), (1, 2)), expect, atol=1e-9)


def test_swinv2_first_block_by_path_folds_earlier_blocks_into_embed():
    m, x = swinv2(torch.float64), images(torch.float64)
    full = vd.decompose(m, x)
    part = vd.decompose(m, x, blocks="layers.2.blocks.1")
    assert float(part.residual().max()) <= 1e-10
    assert part.names[1] == "layers.2.blocks.1.attn.head.0"
    for name in ("layers.2.blocks.1.attn.head.2", "layers.3.blocks.0.mlp"):
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=1e-12)
