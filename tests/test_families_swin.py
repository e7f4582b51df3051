"""Swin: exactness, heads sum to blocks, and token maps in image coordinates checked against an
independent construction (timm's own window partition / cyclic shift code + merges by hand)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))


@functools.lru_cache(maxsize=None)
def swin(dtype=torch.float32, img_size=224):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, **SMALL)
    with torch.no_grad():                       # non-trivial norm affines and biases
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(dtype, size=(224, 224), seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


TOKENS = ["layers.0.blocks.0.attn.head.1", "layers.2.blocks.1.attn.head.3"]   # plain and shifted windows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_swin_reconstruction(dtype):
    check_reconstruction(swin(dtype), images(dtype), dtype, grids=((56, 56), (14, 14)))


def check_reconstruction(m, x, dtype, grids):
    """Readout = upstream, reconstruction within TOL for heads on/off × both conventions, tokens sum to
    their head and the token maps of :data:`TOKENS` have the stage ``grids`` (also used for Swin V2)."""
    z = upstream(m, x)
    scale = float(z.norm(dim=-1).max())
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=TOKENS if heads else None)
            assert torch.equal(d.readout, z)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (heads, convention, err)
            if heads:
                for t in TOKENS:
                    torch.testing.assert_close(d.tokens[t].sum(1), d[t], rtol=0, atol=TOL[dtype] * scale)
                for t, g in zip(TOKENS, grids):
                    assert d.token_map(t).shape == (2, *g, m.num_features)
                names = d.names
    assert names[:2] == ["embed", "layers.0.blocks.0.attn.head.0"] and "layers.2.blocks.1.mlp" in names


def test_swin_heads_sum_to_block_and_granularity():
    m, x = swin(torch.float64), images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    for c in off.components:
        if c.kind == "attn":
            idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            torch.testing.assert_close(on.contributions[:, idx].sum(1), off[c.name], rtol=0, atol=1e-12)
    on, off = vd.decompose(m, x), vd.decompose(m, x, heads=False)
    for c in off.components:
        if c.kind in ("embed", "mlp"):
            torch.testing.assert_close(on[c.name], off[c.name], rtol=0, atol=1e-12)


def capture(m, x, block):
    seen = {}
    hs = [block.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0])),
          m.norm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("final", a[0]))]
    for s, st in enumerate(m.layers):
        if s > 0:
            hs.append(st.downsample.norm.register_forward_pre_hook(lambda mod, a, s=s: seen.__setitem__(s, a[0])))
    with torch.inference_mode():
        m.forward_features(x)
    for h in hs:
        h.remove()
    return seen


def carry_by_hand(m, u, stage, seen):
    """Each position's term ``u [B, H, W, C]`` (stage ``stage``) carried separately to z: every later
    patch merging (zero-padded slot, centred over 4C, γ, real σ of the merged position, reduction)
    and the final LayerNorm (real σ of the final position) and the mean over final positions."""
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
        xin = seen[s]
        sig = torch.sqrt(xin.var(-1, unbiased=False, keepdim=True) + ds.norm.eps)[:, Y, X]
        t = (ds.norm.weight * (pad - pad.mean(-1, keepdim=True)) / sig) @ ds.reduction.weight.T
        C = t.shape[-1]
    fin = seen["final"]
    sig = torch.sqrt(fin.var(-1, unbiased=False, keepdim=True) + m.norm.eps)[:, Y, X]
    t = m.norm.weight * (t - t.mean(-1, keepdim=True)) / sig / (fin.shape[1] * fin.shape[2])
    return t.view(B, H, W, -1)


@pytest.mark.parametrize("size", [(224, 224), (168, 104)], ids=["224", "168x104"])
@pytest.mark.parametrize("token", TOKENS)
def test_swin_token_map_in_image_coordinates(token, size):
    """The head's per-position output is produced by timm's own ``_attn`` (cyclic shift, window
    partition and reverse, inverse shift) with the out-projection restricted to that head, then
    carried by hand; the engine's token map must put every term at the same image position."""
    m = swin(torch.float64, size)
    x = images(torch.float64, size)
    path, h = token.rsplit(".attn.head.", 1)
    h = int(h)
    _, s, _, j = path.split(".")
    blk = m.layers[int(s)].blocks[int(j)]
    seen = capture(m, x, blk)
    dh = blk.attn.proj.in_features // blk.attn.num_heads

    def only_head(mod, args, out):
        keep = torch.zeros_like(args[0])
        keep[..., h * dh:(h + 1) * dh] = args[0][..., h * dh:(h + 1) * dh]
        return F.linear(keep, mod.weight)                   # no bias: it belongs to `bias`

    hk = blk.attn.proj.register_forward_hook(only_head)
    try:
        with torch.inference_mode():
            u = blk._attn(blk.norm1(seen["x"]))              # [B, H, W, C] in image coordinates
    finally:
        hk.remove()
    if token == TOKENS[1]:
        assert any(blk.shift_size), "the test must cover a shifted-window block"
    expect = carry_by_hand(m, u, int(s), seen)
    d = vd.decompose(m, x, tokens=[token])
    got = d.token_map(token)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(expect.sum((1, 2)), d[token], rtol=0, atol=1e-12)
    # a wrong placement would not pass: the map is not invariant under the cyclic shift
    assert not torch.allclose(torch.roll(expect, (3, 3), (1, 2)), expect, atol=1e-9)


def test_swin_first_block_by_path_folds_earlier_blocks_into_embed():
    m, x = swin(torch.float64), images(torch.float64)
    full = vd.decompose(m, x)
    part = vd.decompose(m, x, blocks="layers.2.blocks.1")
    assert float(part.residual().max()) <= 1e-10
    assert part.names[1] == "layers.2.blocks.1.attn.head.0"
    assert [c.name for c in vd.components_for(m, blocks="layers.2.blocks.1")] == part.names
    for name in ("layers.2.blocks.1.attn.head.2", "layers.3.blocks.0.mlp"):
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=1e-12)
    earlier = sum(full[c.name] for c in full.components if c.kind != "bias" and (c.block is None or c.block < 3))
    torch.testing.assert_close(part["embed"], earlier + full["bias"] - part["bias"], rtol=0, atol=1e-12)
