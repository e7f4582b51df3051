"""Swin Transformer V2-CR (timm ``SwinTransformerV2Cr``): post-norm blocks, cosine window attention with a
meta-network position bias, norm-then-reduce patch merging and the extra main-branch norms ``norm3``
(stream-replacing LayerNorms: every earlier component passes through them with their frozen σ).

Exactness against the upstream readout (fp32 and fp64, both conventions, heads on/off), heads sum to the
heads-off attention, tokens sum to their head, and one head's token map against a construction written by
hand from the module weights and hook-captured inputs: windows, cyclic shift, scaled cosine attention,
meta-MLP bias and shift mask, out-projection slice, ``norm1`` with its real σ, then every later ``norm3``,
patch merging and the head's mean pool carried per position with their real σ."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError
from familyutil import upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# "ns": extra norm at every stage end (the _ns models) and, with extra_norm_period=2, mid-stage too
# (stages.0.blocks.1, stages.0.blocks.2, stages.1.blocks.1 have norm3); "plain": only the last block has
# norm3 (timm always ends the last stage with it), non-square input with padded windows and an odd merge.
BUILDS = {
    "ns": ("swinv2_cr_tiny_ns_224", dict(img_size=64, embed_dim=24, depths=(3, 2), num_heads=(2, 4), window_size=4,
                                         extra_norm_period=2)),
    "plain": ("swinv2_cr_tiny_224", dict(img_size=(56, 40), embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                                         window_size=4)),
}
TOKENS = {"ns": ["stages.0.blocks.1.attn.head.1", "stages.1.blocks.0.attn.head.2"],
          "plain": ["stages.0.blocks.1.attn.head.0", "stages.1.blocks.1.attn.head.3"]}


@functools.lru_cache(maxsize=None)
def model(build: str, dtype=torch.float32):
    import timm

    name, kw = BUILDS[build]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw)
    with torch.no_grad():                 # timm zero-initialises the post-norm γ: perturb norms and biases
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def images(m, dtype, seed=1):
    return torch.randn(2, 3, *m.patch_embed.img_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def norm3_paths(m):
    return [f"stages.{s}.blocks.{j}" for s, st in enumerate(m.stages) for j, b in enumerate(st.blocks)
            if not isinstance(b.norm3, torch.nn.Identity)]


def test_builds_cover_the_norm3_placements():
    assert norm3_paths(model("ns")) == ["stages.0.blocks.1", "stages.0.blocks.2", "stages.1.blocks.1"]
    assert norm3_paths(model("plain")) == ["stages.1.blocks.1"]
    assert any(model("plain").stages[0].blocks[1].shift_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("build", list(BUILDS))
def test_swinv2_cr_reconstruction(build, dtype):
    """Readout = upstream, reconstruction within TOL (heads on/off × conventions), tokens sum to their head."""
    m = model(build, dtype)
    x = images(m, dtype)
    z = upstream(m, x)
    scale = float(z.norm(dim=-1).max())
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=TOKENS[build] if heads else None)
            assert d.contributions.dtype == dtype
            assert torch.equal(d.readout, z)
            err = float(d.residual().max())
            assert err <= TOL[dtype], (heads, convention, err)
            if heads:
                for t in TOKENS[build]:
                    torch.testing.assert_close(d.tokens[t].sum(1), d[t], rtol=0, atol=TOL[dtype] * scale)
    assert d.names[:3] == ["embed", "stages.0.blocks.0.attn", "stages.0.blocks.0.mlp"]


@pytest.mark.parametrize("build", list(BUILDS))
def test_swinv2_cr_heads_sum_to_block(build):
    """uniform: a block's heads sum to its heads-off attention; centered: heads + bias = attention + bias."""
    m = model(build, torch.float64)
    x = images(m, torch.float64)
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


# ------------------------------------------------------------------------------------------ by hand
def capture(m, x):
    """Inputs of every block, ``norm1``, ``norm3`` and merge norm in one real forward pass."""
    seen, hs = {}, []
    for name, mod in m.named_modules():
        if name.endswith(("norm1", "norm3", "downsample.norm")) or (name.count(".") == 3 and ".blocks." in name):
            hs.append(mod.register_forward_pre_hook(lambda _, a, n=name: seen.__setitem__(n, a[0])))
    try:
        upstream(m, x)
    finally:
        for h in hs:
            h.remove()
    return seen


def sigma(t, eps):
    return torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + eps)


def head_by_hand(blk, xin, h):
    """Head ``h`` of ``blk``'s window attention per image position ``[B, H, W, D]`` (its slice of the
    out-projection plus ``b_O/H``), from the block input ``xin [B, H, W, C]`` and the module's weights."""
    a = blk.attn
    B, H, W, C = xin.shape
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    nh, dh = a.num_heads, C // a.num_heads
    t = torch.roll(xin, (-sh, -sw), (1, 2))
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    t = F.pad(t, (0, 0, 0, Wp - W, 0, Hp - H))
    win = t.reshape(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, wh * ww, C)
    qkv = (win @ a.qkv.weight.T + a.qkv.bias).reshape(*win.shape[:3], 3, nh, dh)[..., h, :]
    q, k, v = qkv.unbind(-2)                                                # [B, nW, L, dh]
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    scores = scores * torch.exp(torch.clamp(a.logit_scale[h], max=math.log(100.0)))
    mlp = a.meta_mlp                                                        # position bias: fc1 → ReLU → fc2
    bias = torch.relu(a.relative_coordinates_log @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    L = wh * ww
    scores = scores + bias[:, h].reshape(L, L)
    if blk.attn_mask is not None:
        scores = scores + blk.attn_mask                                     # [nW, L, L], shared by images
    o = scores.softmax(-1) @ v                                              # [B, nW, L, dh]
    u = o @ a.proj.weight[:, h * dh:(h + 1) * dh].T + a.proj.bias / nh      # [B, nW, L, D]
    D = u.shape[-1]
    u = u.reshape(B, Hp // wh, Wp // ww, wh, ww, D).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, D)[:, :H, :W]
    return torch.roll(u, (sh, sw), (1, 2))


def carry_by_hand(m, u, stage, block, seen):
    """Each position's term ``u [B, H, W, C]`` (added after ``stages.stage.blocks.block``'s attention)
    carried separately to z: every later ``norm3`` (γ ⊙ C(·)/σ with the real σ of that position), every
    V1-order patch merging (zero-padded slot, γ ⊙ C/σ of the merged position, then the reduction) and the
    head's mean over final positions."""
    B, H, W, C = u.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    Y, X, t = ys.flatten(), xs.flatten(), u.reshape(B, H * W, C)
    for s, st in enumerate(m.stages):
        if s < stage:
            continue
        if s > stage:
            ds = st.downsample
            xm = seen[f"stages.{s}.downsample.norm"]                         # [B, h', w', 4C]
            slot = 2 * (X % 2) + (Y % 2)                                    # timm's concat order (x offset, y offset)
            Y, X = Y // 2, X // 2
            pad = t.new_zeros(B, t.shape[1], 4 * C)
            for j in range(4):
                pad[:, slot == j, j * C:(j + 1) * C] = t[:, slot == j]
            n = ds.norm
            t = (n.weight * (pad - pad.mean(-1, keepdim=True)) / sigma(xm, n.eps)[:, Y, X]) @ ds.reduction.weight.T
            C = t.shape[-1]
        for j, blk in enumerate(st.blocks):
            if (s == stage and j < block) or isinstance(blk.norm3, torch.nn.Identity):
                continue
            xn = seen[f"stages.{s}.blocks.{j}.norm3"]                        # [B, N, C]
            hw = seen[f"stages.{s}.blocks.{j}"].shape[1:3]
            sg = sigma(xn, blk.norm3.eps).reshape(B, *hw, 1)[:, Y, X]
            t = blk.norm3.weight * (t - t.mean(-1, keepdim=True)) / sg
    n_final = seen[f"stages.{len(m.stages) - 1}.blocks.0"].shape[1:3].numel()
    return (t / n_final).view(B, H, W, -1)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("which", [0, 1])
def test_swinv2_cr_token_map_against_hand_formula(build, which):
    """The engine's token map of one head equals the hand construction at every image position (fp64,
    centered), and sums to the head."""
    m = model(build, torch.float64)
    x = images(m, torch.float64)
    token = TOKENS[build][which]
    path, h = token.rsplit(".attn.head.", 1)
    _, s, _, j = path.split(".")
    s, j, h = int(s), int(j), int(h)
    blk = m.stages[s].blocks[j]
    seen = capture(m, x)
    with torch.inference_mode():
        u = head_by_hand(blk, seen[path], h)
        n1 = blk.norm1
        u = n1.weight * (u - u.mean(-1, keepdim=True)) / sigma(seen[f"{path}.norm1"], n1.eps)
        expect = carry_by_hand(m, u, s, j, seen)
    d = vd.decompose(m, x, tokens=[token])
    got = d.token_map(token)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(expect.sum((1, 2)), d[token], rtol=0, atol=1e-12)
    assert float(expect.abs().max()) > 1e-3                                   # not vacuous


def test_swinv2_cr_first_block_by_path_folds_earlier_blocks_and_norms_into_embed():
    """Starting after two norm3 transitions: the embed takes the real stream there, later components keep
    their values."""
    m = model("ns", torch.float64)
    x = images(m, torch.float64)
    full = vd.decompose(m, x)
    part = vd.decompose(m, x, blocks="stages.0.blocks.2")
    assert float(part.residual().max()) <= 1e-10
    assert part.names[1] == "stages.0.blocks.2.attn.head.0"
    for name in ("stages.0.blocks.2.attn.head.1", "stages.0.blocks.2.mlp", "stages.1.blocks.1.mlp"):
        torch.testing.assert_close(part[name], full[name], rtol=0, atol=1e-12)


def test_swinv2_cr_non_mean_pool_is_refused():
    import timm

    name, kw = BUILDS["plain"]
    m = timm.create_model(name, pretrained=False, global_pool="max", **kw).eval()
    with pytest.raises(UnsupportedModuleError, match="head.global_pool"):
        vd.decompose(m, images(m, torch.float32))
