"""SAM ViT (timm ``VisionTransformerSAM``, vitdecomp/engine/rules/sam.py): windowed (padded) and global
attention with decomposed relative position terms, then the conv neck (1×1 conv, LayerNorm2d, 3×3 conv,
LayerNorm2d) and mean pooling.

Readout equals the upstream ``forward_head(forward_features(x), pre_logits=True)``, reconstruction ≤ 1e-5
(fp32) / ≤ 1e-10 (fp64), heads sum to the heads-off attention, tokens sum to their head; one head of a
windowed block recomputed by hand (weights, hook-captured block input, timm's own window partition and
relative position helpers) and carried through the neck by hand with ``F.conv2d`` and the real σ of both
neck norms — the whole head and, position by position, its token map.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.errors import InputError, UnsupportedModuleError
from familyutil import upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
             neck_chans=16, init_values=0.5)   # grid 4×4, windows of 3: block 0 pads to 6×6; block 1 global
VARIANTS = {
    "conv_neck": ("samvit_base_patch16", {}),
    "norm_neck": ("samvit_base_patch16_224", dict(neck_chans=None)),   # LayerNorm2d neck, no abs pos embed
    "mlp_head": ("samvit_base_patch16", dict(neck_chans=0, head_hidden_size=32)),   # NormMlpClassifierHead
    "rope": ("samvit_base_patch16", dict(use_rel_pos=False, use_rope=True)),
}
TOKENS = ["blocks.0.attn.head.1", "blocks.1.attn.head.0"]                # windowed, global


@functools.lru_cache(maxsize=None)
def sam(variant: str = "conv_neck", dtype=torch.float64):
    import timm

    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **{**SMALL, **kw})
    with torch.no_grad():          # non-trivial norm affines, biases, neck and relative position tables (init 0)
        for n, p in m.named_parameters():
            if any(s in n for s in ("norm", "bias", "neck", "rel_pos", "pos_embed")):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(dtype, size=(64, 64), seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sam_reconstruction(variant, dtype):
    m, x = sam(variant, dtype), images(dtype)
    z = upstream(m, x)
    if variant == "mlp_head":                   # the readout is the input of pre_logits' tanh (as MaxViT tf)
        assert m.head.pre_logits.fc is not None
    scale = float(z.norm(dim=-1).max())
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=TOKENS if heads else None)
            assert d.contributions.dtype == dtype
            assert torch.equal(d.readout, z) or torch.equal(torch.tanh(d.readout), z)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (variant, heads, convention, err)
            if heads:
                for t in TOKENS:
                    torch.testing.assert_close(d.tokens[t].sum(1), d[t], rtol=0, atol=TOL[dtype] * scale)
                    assert d.token_map(t).shape == (2, 4, 4, z.shape[-1])
    assert d.names[:2] == ["embed", "blocks.0.attn"] and d.names[-1] == "bias"


@pytest.mark.parametrize("size", [(64, 64), (64, 48)], ids=["64", "64x48"])
def test_sam_heads_sum_to_block(size):
    """uniform: a block's heads sum to its heads-off attention; centered: heads + bias match attention + bias.
    64×48: a 4×3 grid (window padding, global rel-pos tables interpolated by timm)."""
    m, x = sam(), images(torch.float64, size)
    for convention in ("centered", "uniform"):
        on = vd.decompose(m, x, convention=convention)
        off = vd.decompose(m, x, heads=False, convention=convention)
        assert float(on.residual().max()) <= 1e-10 and float(off.residual().max()) <= 1e-10
        moved = torch.zeros_like(on.readout)
        for c in off.components:
            if c.kind == "attn":
                idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
                assert len(idx) == 2
                hsum = on.contributions[:, idx].sum(1)
                if convention == "uniform":
                    torch.testing.assert_close(hsum, off[c.name], rtol=0, atol=1e-12)
                moved = moved + off[c.name] - hsum
            elif c.kind in ("embed", "mlp"):
                torch.testing.assert_close(on[c.name], off[c.name], rtol=0, atol=1e-12)
        if convention == "centered":
            torch.testing.assert_close(moved, on["bias"] - off["bias"], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- by hand
def capture(m, x, blk):
    seen = {}
    hs = [blk.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0])),
          m.neck[1].register_forward_pre_hook(lambda mod, a: seen.__setitem__("ln1", a[0])),
          m.neck[3].register_forward_pre_hook(lambda mod, a: seen.__setitem__("ln2", a[0]))]
    try:
        upstream(m, x)
    finally:
        for h in hs:
            h.remove()
    return seen


@torch.no_grad()
def ln2d_centered(norm, c, real):
    """LayerNorm2d on a component ``c [B, C, H, W]`` with the real input's per-position σ: ``γ ⊙ C(c)/σ``."""
    sigma = torch.sqrt(real.var(1, unbiased=False, keepdim=True) + norm.eps)
    return norm.weight[:, None, None] * (c - c.mean(1, keepdim=True)) / sigma


@torch.no_grad()
def neck_by_hand(m, u, seen):
    """A per-position field ``u [B, H, W, D]`` → its readout term: 1×1 conv, LN1 (frozen σ1), 3×3 conv with
    zero padding, LN2 (frozen σ2), mean over positions (centered convention: no β, no shared means)."""
    y = F.conv2d(u.permute(0, 3, 1, 2), m.neck[0].weight)
    y = ln2d_centered(m.neck[1], y, seen["ln1"])
    y = F.conv2d(y, m.neck[2].weight, padding=1)
    return ln2d_centered(m.neck[3], y, seen["ln2"]).mean((2, 3))


@torch.no_grad()
def windowed_head_by_hand(m, blk, h, x0):
    """Head ``h`` of a windowed SAM block, per position ``[B, H, W, D]``: norm1, timm's padded
    ``window_partition``, q/k/v from the fused qkv weights, scores with timm's decomposed relative position
    terms, softmax, that head's slice of ``proj``, timm's ``window_unpartition``, LayerScale."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, window_partition, window_unpartition

    a, ws = blk.attn, blk.window_size
    B, H, W, D = x0.shape
    win, pad_hw = window_partition(blk.norm1(x0), ws)                         # [B·nW, ws, ws, D]
    t = win.reshape(win.shape[0], ws * ws, D)
    dh = a.head_dim
    rows = [slice(i * D + h * dh, i * D + (h + 1) * dh) for i in range(3)]          # head h of q, k, v
    q, k, v = (F.linear(t, a.qkv.weight[r], a.qkv.bias[r]) for r in rows)
    rel = get_decomposed_rel_pos_bias(q, a.rel_pos_h, a.rel_pos_w, (ws, ws), (ws, ws))
    scores = (q @ k.transpose(-2, -1)) * dh ** -0.5 + rel
    o = scores.softmax(-1) @ v                                                # [B·nW, ws², dh]
    u = o @ a.proj.weight[:, h * dh:(h + 1) * dh].T
    u = window_unpartition(u.reshape(-1, ws, ws, D), ws, (H, W), pad_hw)
    return u * blk.ls1.gamma


@pytest.mark.parametrize("size", [(64, 64), (64, 48)], ids=["64", "64x48"])
def test_sam_windowed_head_and_neck_by_hand(size):
    m = sam()
    x = images(torch.float64, size)
    blk, h, name = m.blocks[0], 1, "blocks.0.attn.head.1"
    assert blk.window_size == 3 and blk.attn.use_rel_pos and blk.attn.rel_pos_h.abs().sum() > 0
    seen = capture(m, x, blk)
    u = windowed_head_by_hand(m, blk, h, seen["x"])                           # [B, H, W, D]
    Hg, Wg = u.shape[1:3]
    assert Hg % 3 or Wg % 3, "the test must cover padded windows"
    want = neck_by_hand(m, u, seen)
    d = vd.decompose(m, x, tokens=[name])
    torch.testing.assert_close(d[name], want, rtol=0, atol=1e-12 * float(want.norm(dim=-1).max()))
    assert float(want.norm(dim=-1).min()) > 1e-6 * float(d.readout.norm(dim=-1).max())
    # token map: each position's term alone (a delta field) through the same neck — the 3×3 taps reach
    # neighbouring outputs, borders lose the taps outside the grid
    got = d.token_map(name)
    assert got.shape == (2, Hg, Wg, want.shape[-1])
    for qy in range(Hg):
        for qx in range(Wg):
            delta = torch.zeros_like(u)
            delta[:, qy, qx] = u[:, qy, qx]
            torch.testing.assert_close(got[:, qy, qx], neck_by_hand(m, delta, seen), rtol=0, atol=1e-13)
    torch.testing.assert_close(got.sum((1, 2)), d[name], rtol=0, atol=1e-12)


def test_sam_norm_neck_by_hand():
    """``neck_chans=None``: a per-position LayerNorm2d then mean pooling; the global block's head 0 by hand
    from its out-projection input."""
    m = sam("norm_neck")
    x = images(torch.float64)
    blk, h = m.blocks[1], 0
    got = {}
    hs = [blk.attn.proj.register_forward_pre_hook(lambda mod, a: got.__setitem__("o", a[0])),
          m.neck.register_forward_pre_hook(lambda mod, a: got.__setitem__("neck", a[0]))]
    try:
        upstream(m, x)
    finally:
        for hd in hs:
            hd.remove()
    dh = blk.attn.head_dim
    with torch.no_grad():
        u = got["o"][..., h * dh:(h + 1) * dh] @ blk.attn.proj.weight[:, h * dh:(h + 1) * dh].T * blk.ls1.gamma
        u = u.reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        want = ln2d_centered(m.neck, u, got["neck"]).mean((2, 3))
    d = vd.decompose(m, x)
    torch.testing.assert_close(d["blocks.1.attn.head.0"], want, rtol=0, atol=1e-12)


def test_sam_first_block_by_path_folds_earlier_blocks_into_embed():
    m, x = sam(), images(torch.float64)
    full, part = vd.decompose(m, x), vd.decompose(m, x, blocks="blocks.1")
    assert float(part.residual().max()) <= 1e-10
    assert part.names[:2] == ["embed", "blocks.1.attn.head.0"]
    for name in ("blocks.1.attn.head.1", "blocks.1.mlp"):
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- refusals
def test_sam_refusals():
    import timm

    def build(**kw):
        return timm.create_model("samvit_base_patch16", pretrained=False, **{**SMALL, **kw}).eval()

    with pytest.raises(UnsupportedModuleError, match="head.global_pool.*'max'"):
        vd.components_for(build(global_pool="max"))
    m = build()
    m.neck[2] = torch.nn.Conv2d(16, 16, 3, padding=1, dilation=1, stride=2, bias=False)
    with pytest.raises(UnsupportedModuleError, match="neck.2: Conv2d.*stride"):
        vd.components_for(m)
    m = build()
    m.neck[1] = torch.nn.BatchNorm2d(16)
    with pytest.raises(UnsupportedModuleError, match="neck.1: BatchNorm2d is not timm's LayerNorm2d"):
        vd.components_for(m)
    rope = sam("rope")
    with pytest.raises(InputError, match="rotary"):
        vd.decompose(rope, images(torch.float64, (64, 48)))
