"""CoAtNet, CoAtNeXt, MaxxViT (v1, v2) and the parallel MaxViT (timm ``MaxxVit``): exactness against the
upstream readout in fp32 and fp64, heads sum to the heads-off attention, tokens sum to their head, one
``TransformerBlock2d`` head (relative position bias) and one parallel-attention head against hand-written
formulas, and the refusals that remain (max-pooling shortcuts, repeated conv modules)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError
from familyutil import upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TINY = dict(embed_dim=(32, 32, 64, 64), stem_width=(16, 32), transformer_dim_head=16)
# name → (timm model, kwargs): every block type of the family, built small (non-trivial LayerScale)
BUILDS = {
    "coatnet": ("coatnet_nano_rw_224", dict(img_size=64, depths=(1, 1, 2, 1), transformer_init_values=0.5, **TINY)),
    "coatnet_rmlp": ("coatnet_rmlp_nano_rw_224", dict(img_size=64, depths=(1, 1, 1, 1), **TINY)),
    "coatnet_bn": ("coatnet_bn_0_rw_224", dict(img_size=64, depths=(1, 1, 1, 1), **TINY)),
    "coatnet_tanh_head": ("coatnet_0_224", dict(img_size=64, depths=(1, 1, 1, 1), head_hidden_size=48, **TINY)),
    "coatnet_cc": ("coatnet_nano_cc_224", dict(img_size=64, depths=(1, 1, 2, 2), **TINY)),
    "coatnext": ("coatnext_nano_rw_224", dict(img_size=64, depths=(1, 1, 1, 1), conv_init_values=0.5, **TINY)),
    "maxxvit": ("maxxvit_rmlp_nano_rw_256", dict(img_size=64, depths=(1, 1, 1, 1), conv_init_values=0.5,
                                                transformer_init_values=0.5, **TINY)),
    "maxxvitv2": ("maxxvitv2_nano_rw_256", dict(img_size=64, depths=(1, 1, 2, 1), conv_init_values=0.5,
                                               transformer_init_values=0.5, **TINY)),
    "maxvit_pm": ("maxvit_tiny_pm_256", dict(img_size=64, depths=(1, 1, 1, 1), transformer_init_values=0.5, **TINY)),
}


@functools.lru_cache(maxsize=None)
def build(key: str, dtype=torch.float64):
    import timm

    name, kw = BUILDS[key]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw)
    with torch.no_grad():                       # non-trivial norm affines, biases, BatchNorm statistics
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.to(dtype).eval().requires_grad_(False)


def images(m, dtype, seed=1):
    return torch.randn(2, 3, *m.img_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def last_affine(m, x):
    """The readout: timm's pre_logits, or (heads with ``pre_logits.fc`` + tanh) the fc output before the tanh."""
    fc = getattr(getattr(m.head, "pre_logits", None), "fc", None)
    if fc is None:
        return upstream(m, x)
    seen = {}
    h = fc.register_forward_hook(lambda mod, a, out: seen.__setitem__("z", out))
    try:
        pre = upstream(m, x)
    finally:
        h.remove()
    assert torch.equal(torch.tanh(seen["z"]), pre)
    return seen["z"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("key", list(BUILDS))
def test_exact_heads_and_tokens(key, dtype):
    """Readout = upstream, reconstruction ≤ 1e-5 / 1e-10 for both conventions and granularities, heads
    (+ their out-projection bias) sum to the heads-off attention, tokens sum to their head."""
    m = build(key, dtype)
    x = images(m, dtype)
    z = last_affine(m, x)
    scale = float(z.norm(dim=-1).max())
    heads = [c for c in vd.components_for(m) if c.kind == "head"]
    tok = [heads[0].name, heads[-1].name]
    for convention in ("centered", "uniform"):
        on = vd.decompose(m, x, convention=convention, tokens=tok)
        off = vd.decompose(m, x, heads=False, convention=convention)
        for d in (on, off):
            assert torch.equal(d.readout, z), key
            err = float(d.residual().max())
            assert err <= TOL[dtype], (key, convention, err)
        for t in tok:
            torch.testing.assert_close(on.tokens[t].sum(1), on[t], rtol=0, atol=TOL[dtype] * scale)
        attn = [c for c in off.components if c.kind == "attn"]
        assert attn
        moved = torch.zeros_like(z)
        for c in attn:
            idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            assert len(idx) == m.get_submodule(c.path).num_heads
            hsum = on.contributions[:, idx].sum(1)
            if convention == "uniform":      # heads carry their share of the out-projection bias
                torch.testing.assert_close(hsum, off[c.name], rtol=0, atol=TOL[dtype] * scale)
            moved = moved + off[c.name] - hsum
        if convention == "centered":         # the out-projection biases move to `bias`
            torch.testing.assert_close(moved, on["bias"] - off["bias"], rtol=0, atol=TOL[dtype] * scale)


def test_component_names_follow_module_paths():
    names = vd.decompose(build("coatnet"), images(build("coatnet"), torch.float64)).names
    assert names[:3] == ["embed", "stages.0.blocks.0.conv", "stages.1.blocks.0.conv"]
    assert "stages.2.blocks.1.attn.head.3" in names and "stages.2.blocks.1.mlp" in names and names[-1] == "bias"
    pm = vd.components_for(build("maxvit_pm"))
    assert {"stages.0.blocks.0.conv.0", "stages.0.blocks.0.conv.1", "stages.0.blocks.0.attn.attn_block.head.0",
            "stages.0.blocks.0.attn.attn_grid.head.1", "stages.0.blocks.0.attn.mlp"} <= {c.name for c in pm}
    v2 = [c.name for c in vd.components_for(build("maxxvitv2")) if c.name.startswith("stages.0.")]
    assert v2[0] == "stages.0.blocks.0.conv" and not any("attn_block" in n for n in v2)    # v2: grid only


# ------------------------------------------------------------------------------------------ by hand
def capture(m, x, paths):
    seen, hs = {}, []
    for p in paths:
        hs.append(m.get_submodule(p).register_forward_pre_hook(lambda mod, a, p=p: seen.__setitem__(p, a[0])))
    try:
        upstream(m, x)
    finally:
        for h in hs:
            h.remove()
    return seen


def rel_bias(table, hw):
    """Swin-style relative position bias from the table alone: ``[H, N, N]`` for a ``hw`` grid."""
    h, w = hw
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    return table[idx].permute(2, 0, 1)


def carry_rw(m, u, stage, final_in):
    """Per-position terms ``u [B, h, w, C]`` living after stage ``stage``'s first block → per-position
    contributions at the last stage ``[B, h_L, w_L, d]``: later stride-2 shortcuts (2×2 average, 1×1
    conv without bias), the per-position final LayerNorm2d with the σ of its real input (centred, β
    excluded), then the mean over positions."""
    t = u
    for s in range(stage + 1, len(m.stages)):
        blk = m.stages[s].blocks[0]
        conv = getattr(blk, "conv", blk)
        sc = (conv[0] if isinstance(conv, torch.nn.Sequential) else conv).shortcut
        assert sc.pool.kernel_size in (2, (2, 2)) and sc.pool.stride in (2, (2, 2))
        t = F.avg_pool2d(t.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        if not isinstance(sc.expand, torch.nn.Identity):
            t = t @ sc.expand.weight[:, :, 0, 0].T
    xf = final_in.permute(0, 2, 3, 1)                                # [B, h_L, w_L, d]
    sig = torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + m.norm.eps)
    t = m.norm.weight * (t - t.mean(-1, keepdim=True)) / sig
    return t / (t.shape[1] * t.shape[2])


@pytest.mark.parametrize("path", ["stages.2.blocks.0", "stages.3.blocks.0"])
def test_transformer_block2d_head_by_hand(path):
    """Head 1 of a ``TransformerBlock2d``: q, k, v from the 1×1-conv qkv on the attention's real input,
    scores + the relative position bias rebuilt from its table, softmax, the head's slice of the 1×1
    out-projection, ``ls1``; carried through the later shortcut and the per-position final norm. The
    head and its token map (per query position; stride-2 shortcuts pool 2×2 children) must match."""
    m = build("coatnet")
    x = images(m, torch.float64)
    blk = m.get_submodule(path)
    attn, h = blk.attn, 1
    seen = capture(m, x, [f"{path}.attn", "norm"])
    a_in = seen[f"{path}.attn"]                                      # [B, C, gh, gw] (pooled by norm1.down)
    B, C, gh, gw = a_in.shape
    H, dh = attn.num_heads, attn.dim_head
    qkv = F.conv2d(a_in, attn.qkv.weight, attn.qkv.bias).reshape(B, H, 3 * dh, gh * gw)   # head_first
    q, k, v = qkv[:, h, :dh], qkv[:, h, dh:2 * dh], qkv[:, h, 2 * dh:]                  # [B, dh, N]
    scores = torch.einsum("bdn,bdm->bnm", q, k) * dh ** -0.5 + rel_bias(attn.rel_pos.relative_position_bias_table,
                                                                      (gh, gw))[h]
    o = torch.einsum("bnm,bdm->bnd", scores.softmax(-1), v)                             # [B, N, dh]
    u = o @ attn.proj.weight[:, h * dh:(h + 1) * dh, 0, 0].T * blk.ls1.gamma          # [B, N, D]
    stage = int(path.split(".")[1])
    per_pos = carry_rw(m, u.reshape(B, gh, gw, -1), stage, seen["norm"])
    name = f"{path}.attn.head.{h}"
    d = vd.decompose(m, x, tokens=[name])
    want = per_pos.sum((1, 2))
    assert float(want.norm(dim=-1).min()) > 1e-6 * float(d.readout.norm(dim=-1).max())
    torch.testing.assert_close(d[name], want, rtol=0, atol=1e-12)
    tmap = d.token_map(name)                                         # [B, gh, gw, d] at the head's stage
    assert tmap.shape[1:3] == (gh, gw)
    if gh == per_pos.shape[1]:
        torch.testing.assert_close(tmap, per_pos, rtol=0, atol=1e-12)
    else:                                                            # 2×2 children share their parent's term
        torch.testing.assert_close(F.avg_pool2d(tmap.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1) * 4, per_pos,
                                   rtol=0, atol=1e-12)


def test_parallel_attention_head_by_hand():
    """A grid-attention head of ``ParallelPartitionAttention`` writes the *second* half of the channels:
    its slice of the out-projection input (hooked) times its slice of ``proj``, zero-padded in front,
    ``ls1``, timm's ``grid_reverse``; carried through the later shortcuts and the final norm."""
    from timm.models.maxxvit import grid_reverse

    m = build("maxvit_pm")
    x = images(m, torch.float64)
    path = "stages.2.blocks.0.attn"
    pa = m.get_submodule(path)
    seen = capture(m, x, [f"{path}.attn_grid.proj", path, "norm"])
    inp = seen[f"{path}.attn_grid.proj"]                            # [B·windows, p, p, H·dh]
    g = pa.attn_grid
    h, dh = 1, g.dim_head
    half = g.proj.out_features
    y = inp[..., h * dh:(h + 1) * dh] @ g.proj.weight[:, h * dh:(h + 1) * dh].T
    y = torch.cat([torch.zeros_like(y), y], -1) * pa.ls1.gamma      # concat(window, grid): grid is second
    assert y.shape[-1] == 2 * half
    u = grid_reverse(y, pa.partition_size, seen[path].shape[1:3])   # [B, gh, gw, D]
    want = carry_rw(m, u, 2, seen["norm"]).sum((1, 2))
    got = vd.decompose(m, x)[f"{path}.attn_grid.head.{h}"]
    assert float(want.norm(dim=-1).min()) > 1e-6
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_batchnorm_final_norm_is_a_channel_affine():
    """``coatnet_bn``: the final BatchNorm2d is ``γ/√(var+eps)`` per channel; its shifted β is the only
    offset it adds, so with heads off the MLP of the last block is its branch output averaged and scaled."""
    m = build("coatnet_bn")
    x = images(m, torch.float64)
    blk = m.stages[3].blocks[0]
    out = {}
    hk = blk.mlp.register_forward_hook(lambda mod, a, o: out.__setitem__("mlp", o))
    upstream(m, x)
    hk.remove()
    bn = m.norm
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    want = out["mlp"].mean((2, 3)) * scale
    d = vd.decompose(m, x, heads=False)
    torch.testing.assert_close(d["stages.3.blocks.0.mlp"], want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ refusals
def test_max_pool_shortcut_is_refused():
    import timm

    with torch.device("meta"):
        m = timm.create_model("coatnet_rmlp_1_rw_224")
    with pytest.raises(UnsupportedModuleError, match=r"stages\.0\.blocks\.0\.shortcut\.pool: MaxPool2d is not a "
                                                     r"linear"):
        vd.components_for(m)


def test_repeated_conv_module_is_refused():
    """timm's ParallelMaxxVitBlock with num_conv=3 applies one conv module twice: hooks cannot tell the calls apart."""
    from timm.models.maxxvit import MaxxVitConvCfg, MaxxVitTransformerCfg, ParallelMaxxVitBlock
    from vitdecomp.engine.rules import rule_for

    blk = ParallelMaxxVitBlock(16, 16, num_conv=3, conv_cfg=MaxxVitConvCfg(),
                               transformer_cfg=MaxxVitTransformerCfg(window_size=(2, 2), dim_head=8))
    with pytest.raises(UnsupportedModuleError, match=r"blk\.conv: one conv block module is applied more than once"):
        rule_for("block", "blk", blk)("blk", blk)


def test_batchnorm_without_running_stats_is_refused():
    import timm

    m = timm.create_model("coatnet_bn_0_rw_224", img_size=64, depths=(1, 1, 1, 1), **TINY).eval()
    m.norm.running_mean = None
    m.norm.running_var = None
    m.norm.track_running_stats = False
    with pytest.raises(UnsupportedModuleError, match=r"norm: BatchNorm2d without running statistics"):
        vd.components_for(m)


@pytest.mark.parametrize("key,first", [("coatnet", "stages.2.blocks.1"), ("coatnet", "stages.3.blocks.0"),
                                       ("maxvit_pm", "stages.2.blocks.0")])
def test_blocks_from_path(key, first):
    """Earlier blocks fold into ``embed`` (the stream entering ``first``, before its stride-2 shortcut);
    later components are unchanged."""
    m = build(key)
    x = images(m, torch.float64)
    full = vd.decompose(m, x, tokens=None)
    part = vd.decompose(m, x, blocks=first)
    assert part.names[1].startswith(first + ".") and float(part.residual().max()) <= 1e-10
    for name in part.names[1:-1]:
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=1e-12)
