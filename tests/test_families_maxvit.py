"""MaxViT: exactness, heads sum to their attention layer, readout = the head's pre-activation
feature, and window / grid token maps in image coordinates against an independent construction."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(embed_dim=(32, 32, 64, 64), depths=(1, 1, 2, 1), stem_width=16, head_hidden_size=64, img_size=128,
             transformer_dim_head=16)


@functools.lru_cache(maxsize=None)
def maxvit(dtype=torch.float32, **extra):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("maxvit_tiny_tf_224", pretrained=False, **SMALL, **extra)
    with torch.no_grad():                       # non-trivial norm affines, biases, BatchNorm statistics
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.to(dtype).eval()


def images(dtype, seed=1):
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


TOKENS = ["stages.0.blocks.0.attn_block.attn.head.1", "stages.2.blocks.1.attn_grid.attn.head.2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_maxvit_reconstruction(dtype):
    m, x = maxvit(dtype), images(dtype)
    pre = upstream(m, x)                                    # tanh(fc(LN(mean x))): timm's pre_logits
    seen = {}
    hk = m.head.pre_logits.fc.register_forward_hook(lambda mod, a, out: seen.__setitem__("fc", out))
    upstream(m, x)
    hk.remove()
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=TOKENS if heads else None)
            assert torch.equal(d.readout, seen["fc"]), "readout = the head's last affine output"
            assert torch.equal(torch.tanh(d.readout), pre)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (heads, convention, err)
            if heads:
                scale = float(d.readout.norm(dim=-1).max())
                for t in TOKENS:
                    torch.testing.assert_close(d.tokens[t].sum(1), d[t], rtol=0, atol=TOL[dtype] * scale)
                assert d.token_map(TOKENS[0]).shape == (2, 32, 32, 64)
                assert d.token_map(TOKENS[1]).shape == (2, 8, 8, 64)
                kinds = [c.kind for c in d.components]
                assert kinds.count("conv") == 5 and "stages.3.blocks.0.attn_grid.mlp" in d.names


def test_maxvit_heads_sum_to_layer_and_layerscale():
    m, x = maxvit(torch.float64, transformer_init_values=0.5), images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    assert float(on.residual().max()) <= 1e-10
    n = 0
    for c in off.components:
        if c.kind == "attn":
            idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            torch.testing.assert_close(on.contributions[:, idx].sum(1), off[c.name], rtol=0, atol=1e-12)
            n += 1
    assert n == 10                                          # window + grid attention in 5 blocks


def capture(m, x, module):
    seen = {}
    hs = [module.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0])),
          m.head.norm.register_forward_pre_hook(lambda mod, a: seen.__setitem__("pooled", a[0].flatten(1)))]
    with torch.inference_mode():
        m.forward_features(x)
        m.forward_head(m.forward_features(x), pre_logits=True)
    for h in hs:
        h.remove()
    return seen


def carry_by_hand(m, u, stage, seen):
    """Per-position terms ``u [B, H, W, C]`` of stage ``stage`` → ``[B, H, W, d]``: every later stride-2
    shortcut is a 2×2 average (weight 1/4 per child, sizes even) and a 1×1 conv, the head averages
    the last grid; so each position weighs 1/(H·W) of its own stage; then the head's LayerNorm with
    the real pooled statistics (centred per term, β excluded) and ``pre_logits.fc`` (bias excluded)."""
    t = u / (u.shape[1] * u.shape[2])
    for s in range(stage + 1, len(m.stages)):
        sc = m.stages[s].blocks[0].conv.shortcut
        assert tuple(sc.pool.kernel_size) == (2, 2) and tuple(sc.pool.stride) == (2, 2)
        if not isinstance(sc.expand, torch.nn.Identity):
            t = t @ sc.expand.weight[:, :, 0, 0].T
    n, pooled = m.head.norm, seen["pooled"]
    sig = torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + n.eps)[:, None, None]
    t = n.weight * (t - t.mean(-1, keepdim=True)) / sig
    return t @ m.head.pre_logits.fc.weight.T


@pytest.mark.parametrize("token", TOKENS)
def test_maxvit_token_map_in_image_coordinates(token):
    """Head output per position from timm's own partition / attention / reverse code (the window or
    grid partition of the block), restricted to one head, carried by hand."""
    m, x = maxvit(torch.float64), images(torch.float64)
    path, h = token.rsplit(".attn.head.", 1)
    h = int(h)
    stage = int(path.split(".")[1])
    pa = m.get_submodule(path)
    seen = capture(m, x, pa)
    dh = pa.attn.dim_head

    def only_head(mod, args, out):
        keep = torch.zeros_like(args[0])
        keep[..., h * dh:(h + 1) * dh] = args[0][..., h * dh:(h + 1) * dh]
        return F.linear(keep, mod.weight)

    hk = pa.attn.proj.register_forward_hook(only_head)
    try:
        with torch.inference_mode():
            u = pa.ls1(pa._partition_attn(pa.norm1(seen["x"])))       # [B, H, W, C] image coordinates
    finally:
        hk.remove()
    expect = carry_by_hand(m, u, stage, seen)
    d = vd.decompose(m, x, tokens=[token])
    got = d.token_map(token)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(expect.sum((1, 2)), d[token], rtol=0, atol=1e-12)
    assert pa.partition_block == ("attn_block" in token)


def test_mbconv_branch_by_hand():
    """``stages.1.blocks.0.conv`` = the MBConv branch output (BN, depthwise conv, SE frozen inside)
    averaged over its stage grid and carried through later shortcuts' 1×1 convs and the head."""
    m, x = maxvit(torch.float64), images(torch.float64)
    conv = m.stages[1].blocks[0].conv
    seen = capture(m, x, conv)
    with torch.inference_mode():
        xin = seen["x"]
        y = conv.conv3_1x1(conv.se(conv.norm2(conv.conv2_kxk(conv.norm1(conv.conv1_1x1(conv.down(conv.pre_norm(xin))))))))
        u = y.permute(0, 2, 3, 1)
        expect = carry_by_hand(m, u, 1, seen).sum((1, 2))
    d = vd.decompose(m, x)
    torch.testing.assert_close(d["stages.1.blocks.0.conv"], expect, rtol=0, atol=1e-12)


def test_maxvit_blocks_from_path():
    m, x = maxvit(torch.float64), images(torch.float64)
    full = vd.decompose(m, x)
    part = vd.decompose(m, x, blocks="stages.2.blocks.1")
    assert part.names[1] == "stages.2.blocks.1.conv" and float(part.residual().max()) <= 1e-10
    torch.testing.assert_close(part["stages.3.blocks.0.conv"], full["stages.3.blocks.0.conv"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_maxvit_rw_per_position_final_norm(dtype):
    """``rw`` variants: LayerNorm2d on every position, then a plain mean-pool head (rel-pos MLP bias)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=128).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    m = m.to(dtype)
    x = images(dtype)
    z = upstream(m, x)
    tok = "stages.1.blocks.0.attn_grid.attn.head.1"
    for convention in ("centered", "uniform"):
        for heads in (True, False):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[tok] if heads else None)
            assert torch.equal(d.readout, z)
            assert float(d.residual().max()) <= TOL[dtype], (convention, heads)
            if heads:
                torch.testing.assert_close(d.tokens[tok].sum(1), d[tok], rtol=0,
                                           atol=TOL[dtype] * float(z.norm(dim=-1).max()))


@pytest.mark.parametrize("name,pattern", [
    # CoAtNet / MaxxViT blocks are supported (tests/test_families_coatnet.py); a max-pooling shortcut is not linear
    ("coatnet_rmlp_1_rw_224", r"stages\.0\.blocks\.0\.shortcut\.pool: MaxPool2d is not a linear"),
    ("pvt_v2_b0", r"no model rule for .*PyramidVisionTransformerV2"),   # a family not decomposed yet
])
def test_unsupported_variants_are_refused_with_their_path(name, pattern):
    import timm

    from vitdecomp.errors import UnsupportedModuleError

    with torch.device("meta"):
        m = timm.create_model(name)
    with pytest.raises(UnsupportedModuleError, match=pattern):
        vd.components_for(m)
