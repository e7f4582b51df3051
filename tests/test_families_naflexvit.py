"""NaFlexViT (vitdecomp/engine/rules/naflexvit.py), EVA DINOv3 (per-token final norm + mean pooling) and
the ViT ``ResPostBlock`` (``vit_base_patch16_rpn_224``, vitdecomp/engine/rules/vit_variants.py).

Every family: readout equals the upstream model's ``forward_head(forward_features(x), pre_logits=True)``,
reconstruction ≤ 1e-5 (fp32) / ≤ 1e-10 (fp64), heads sum to the heads-off attention component,
tokens sum to their head, and one head against a hand-written formula computed from the module's
weights and hook-captured inputs (not through the engine).
"""
from __future__ import annotations

import functools

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import InputError, UnsupportedModuleError
from familyutil import ln_lin, upstream

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(embed_dim=48, num_heads=3, depth=2, img_size=48)
FAMILIES = {
    "naflexvit_gap": ("naflexvit_base_patch16_gap", dict(SMALL)),             # 4 registers, mean → fc_norm
    "naflexvit_map": ("naflexvit_base_patch16_map", dict(SMALL)),             # attention pool over the patches
    "naflexvit_token": ("naflexvit_base_patch16_radio_v3", dict(SMALL)),      # C-RADIO: class token, no norm
    "naflexvit_norm_gap": ("naflexvit_base_patch16_gap", dict(SMALL, fc_norm=False)),   # per-token norm + mean
    "naflexvit_parfac": ("naflexvit_base_patch16_parfac_gap", dict(SMALL)),   # factorized position embedding
    "naflexvit_rope": ("naflexvit_base_patch16_gap", dict(SMALL, rope_type="axial", pos_embed="none")),  # EvaBlock
    "dinov3": ("vit_small_patch16_dinov3", dict(SMALL)),                      # EVA, rope, 4 registers, norm + mean
    "dinov3_7b": ("vit_7b_patch16_dinov3", dict(SMALL)),                       # SwiGLU MLP
    "dinov3_token": ("vit_small_patch16_dinov3", dict(SMALL, global_pool="token")),   # upstream DINOv3's CLS readout
    "vit_rpn": ("vit_base_patch16_rpn_224", dict(SMALL)),                      # post-norm blocks, mean → fc_norm
    "vit_rpn_gap": ("vit_base_patch16_rpn_224", dict(SMALL, fc_norm=False)),   # post-norm + per-token norm + mean
}
VARIANTS = {"naflexvit_parfac", "naflexvit_rope", "dinov3_7b", "dinov3_token", "vit_rpn_gap"}
CASES = [pytest.param(f, dt, id=f"{f}-{tag}", marks=[pytest.mark.slow] if f in VARIANTS and tag == "fp32" else [])
         for f in FAMILIES for dt, tag in ((torch.float32, "fp32"), (torch.float64, "fp64"))]


@functools.lru_cache(maxsize=None)
def build(family: str, dtype=torch.float32):
    import timm

    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw)
    with torch.no_grad():        # non-trivial norm affines, biases, gains, tokens
        for n, p in m.named_parameters():
            if any(s in n for s in ("norm", "gamma", "bias", "ls", "token", "latent")):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def images(dtype, size=48):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def last_head(m) -> str:
    return [c.name for c in vd.components_for(m) if c.kind == "head"][-1]


@pytest.mark.parametrize("family,dtype", CASES)
def test_reconstruction_readout_and_tokens(family, dtype):
    m = build(family, dtype)
    x = images(dtype)
    z = upstream(m, x)
    name = last_head(m)
    for heads, convention in ((True, "centered"), (True, "uniform"), (False, "centered")):
        d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[name] if heads else None)
        assert torch.equal(d.readout, z), (family, "readout differs from the upstream model's")
        err = float(d.residual().max())
        assert err <= TOL[dtype], (family, heads, convention, err)
        if heads:
            scale = float(z.norm(dim=-1).max())
            torch.testing.assert_close(d.tokens[name].sum(1), d[name], rtol=0, atol=TOL[dtype] * scale)
            assert float(d[name].norm()) > 1e-4 * scale                          # the head is not trivially zero


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_sum_to_attention_component(family):
    m = build(family, torch.float64)
    x = images(torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    paths = sorted({c.path for c in on.components if c.kind == "head"})
    assert paths and all(p in off.names for p in paths)
    for p in paths:
        heads = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == p]
        torch.testing.assert_close(on.contributions[:, heads].sum(1), off[p], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family,plan_family", [
    ("naflexvit_gap", "timm-naflexvit"), ("naflexvit_token", "timm-naflexvit"), ("naflexvit_map", "timm-naflexvit-map"),
    ("naflexvit_norm_gap", "timm-naflexvit-gap"), ("dinov3", "timm-eva-gap"), ("vit_rpn", "timm-vit"),
    ("vit_rpn_gap", "timm-vit-gap")])
def test_plan_kind(family, plan_family):
    from vitdecomp.engine.rules.models import plan_for

    assert plan_for(build(family, torch.float64)).family == plan_family


def test_other_image_size_and_blocks_option():
    """NaFlexVit resizes its position embedding to any grid: a 64-pixel batch of a 48-pixel build is exact;
    ``blocks=[-1]`` folds the first block into ``embed``."""
    m = build("naflexvit_map", torch.float64)
    x = images(torch.float64, 64)
    d = vd.decompose(m, x, blocks=[-1])
    assert torch.equal(d.readout, upstream(m, x))
    assert float(d.residual().max()) <= 1e-10
    assert {c.block for c in d.components if c.block is not None} == {len(m.blocks) - 1}


# ------------------------------------------------------------------------------ hand-written heads
def _run(m, x, modules: dict) -> dict:
    """One real forward pass; each module's positional inputs (``key.in``) and output (``key.out``)."""
    seen, hooks = {}, []
    for key, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(lambda _, a, key=key: seen.__setitem__(key + ".in", a[0])))
        hooks.append(mod.register_forward_hook(lambda _, __, out, key=key: seen.__setitem__(key + ".out", out)))
    try:
        with torch.inference_mode():
            m.forward_head(m.forward_features(x), pre_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _head_by_qkv(a, xin, h):
    """Head ``h`` of a timm ``Attention`` (fused qkv, no q/k norm) per query: ``softmax(q_h k_hᵀ/√dh) v_h W_O,hᵀ``."""
    D = xin.shape[-1]
    dh = D // a.num_heads
    qkv = xin @ a.qkv.weight.T + (a.qkv.bias if a.qkv.bias is not None else 0)
    sl = slice(h * dh, (h + 1) * dh)
    q, k, v = qkv[..., :D][..., sl], qkv[..., D:2 * D][..., sl], qkv[..., 2 * D:][..., sl]
    o = (q @ k.transpose(1, 2) / dh ** 0.5).softmax(-1) @ v
    return o @ a.proj.weight[:, sl].T


def _check(d, name, expect):
    got = d[name]
    assert float(expect.norm()) > 1e-4 * float(d.readout.norm())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-11)


@pytest.mark.parametrize("family", ["naflexvit_gap", "naflexvit_map", "naflexvit_token", "naflexvit_norm_gap"])
def test_naflexvit_head_by_hand(family):
    """Head h of the last block: softmax(q_h k_hᵀ/√dh) v_h W_O,hᵀ per position (from the block's normed input),
    times LayerScale γ1; then the readout by hand: class token (no norm) / mean over the patches (registers
    excluded) through fc_norm / per-token final norm then mean / attention pool — the latent query's frozen
    attention over the patches, the pool's value and out-projections."""
    m = build(family, torch.float64)
    x = images(torch.float64)
    blk, h = m.blocks[-1], 1
    mods = {"attn": blk.attn, "last": blk, "norm": m.norm, "fc_norm": m.fc_norm}
    if m.attn_pool is not None:
        mods["pool"] = m.attn_pool
    seen = _run(m, x, mods)
    c = _head_by_qkv(blk.attn, seen["attn.in"], h) * blk.ls1.gamma                   # [B, N, D]
    npt = m.num_prefix_tokens
    if m.attn_pool is not None:                                                      # final norm, then the pool
        ap, xp = m.attn_pool, seen["pool.in"]                                       # pool input: normed patches
        assert xp.shape[1] == c.shape[1] - npt
        y = ln_lin(m.norm, c[:, npt:], seen["norm.in"][:, npt:])
        B, P, D = xp.shape
        Hp, dhp = ap.num_heads, ap.head_dim
        q = (ap.latent @ ap.q.weight.T + ap.q.bias).reshape(1, Hp, dhp)             # one latent query
        k = (xp @ ap.kv.weight[:D].T + ap.kv.bias[:D]).reshape(B, P, Hp, dhp)
        alpha = torch.einsum("hd,bphd->bhp", q[0], k).mul(dhp ** -0.5).softmax(-1)   # frozen, Σ_p = 1
        v = (y @ ap.kv.weight[D:].T).reshape(B, P, Hp, dhp)                         # value bias → bias
        o = torch.einsum("bhp,bphd->bhd", alpha, v).reshape(B, D)
        expect = o @ ap.proj.weight.T
    elif m.global_pool == "token":
        assert isinstance(m.norm, torch.nn.Identity) and isinstance(m.fc_norm, torch.nn.Identity)
        expect = c[:, 0]
    elif not isinstance(m.norm, torch.nn.Identity):                                  # per-token norm, then mean
        expect = ln_lin(m.norm, c[:, npt:], seen["norm.in"][:, npt:]).mean(1)
    else:
        expect = ln_lin(m.fc_norm, c[:, npt:].mean(1), seen["fc_norm.in"])
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


def test_dinov3_per_position_readout_by_hand():
    """DINOv3 (``global_pool='avg'``, final norm per token, no fc_norm): ``z = (1/P) Σ_{n ≥ npt} LN(x_L[n])``
    over the P patch tokens (class + 4 register tokens excluded). With every σ_n frozen, head h's
    contribution is ``(1/P) Σ_n γ ⊙ (u_n − mean u_n) / σ_n``, ``u_n = γ1 ⊙ o_h[n] W_O,hᵀ`` (``o_h``: the head's
    rotary attention output, the out-projection input), σ_n = √(var x_L[n] + eps). Its per-position terms
    (token contributions) are the summands: zero at the prefix tokens."""
    m = build("dinov3", torch.float64)
    x = images(torch.float64)
    blk, h = m.blocks[-1], 2
    a = blk.attn
    seen = _run(m, x, {"proj": a.proj, "norm": m.norm})
    H = a.num_heads
    dh = a.proj.in_features // H
    sl = slice(h * dh, (h + 1) * dh)
    u = (seen["proj.in"][..., sl] @ a.proj.weight[:, sl].T) * blk.gamma_1            # [B, N, D]
    npt = m.num_prefix_tokens
    assert npt == 5
    xl = seen["norm.in"]
    P = xl.shape[1] - npt
    sigma = torch.sqrt(xl.var(-1, unbiased=False, keepdim=True) + m.norm.eps)        # [B, N, 1]
    per_pos = m.norm.weight * (u - u.mean(-1, keepdim=True)) / sigma / P             # [B, N, D]
    name = f"blocks.{len(m.blocks) - 1}.attn.head.{h}"
    d = vd.decompose(m, x, tokens=[name])
    _check(d, name, per_pos[:, npt:].sum(1))
    torch.testing.assert_close(d.tokens[name][:, npt:], per_pos[:, npt:], rtol=0, atol=1e-12)
    assert float(d.tokens[name][:, :npt].abs().max()) == 0.0


@pytest.mark.parametrize("family", ["vit_rpn", "vit_rpn_gap"])
def test_respost_head_by_hand(family):
    """``ResPostBlock``: ``x + LN1(attn(x))``. Head h's share per query is γ1 ⊙ C(o_h W_O,hᵀ + b_O/H)/σ_q
    (σ_q of the whole attention output, LN1's input), o_h recomputed from qkv; then the mean over the
    tokens (no class token) through fc_norm, or through the per-token final norm first."""
    m = build(family, torch.float64)
    x = images(torch.float64)
    blk, h = m.blocks[-1], 1
    a = blk.attn
    seen = _run(m, x, {"attn": a, "last": blk, "norm": m.norm, "fc_norm": m.fc_norm})
    c = _head_by_qkv(a, seen["attn.in"], h) + a.proj.bias / a.num_heads
    t = ln_lin(blk.norm1, c, seen["attn.out"])                                      # β1 excluded
    assert m.num_prefix_tokens == 0
    if isinstance(m.norm, torch.nn.Identity):
        expect = ln_lin(m.fc_norm, t.mean(1), seen["fc_norm.in"])
    else:
        expect = ln_lin(m.norm, t, seen["norm.in"]).mean(1)
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


# ------------------------------------------------------------------------------------- refusals
def test_naflex_inputs_refused():
    m = build("naflexvit_gap", torch.float64)
    x = images(torch.float64)
    from timm.models.naflexvit import batch_patchify

    patches, (gh, gw) = batch_patchify(x, (16, 16))
    coord = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(1, -1, 2)
    batch = {"patches": patches, "patch_coord": coord.expand(2, -1, -1),
             "patch_valid": torch.ones(2, gh * gw, dtype=torch.bool)}
    with pytest.raises(InputError, match="tensor"):
        vd.decompose(m, batch)
    with pytest.raises(InputError, match="shape"):
        vd.decompose(m, patches)                                                     # pre-patchified [B, N, P·P·C]
    with pytest.raises(InputError, match="multiple of the patch size"):
        vd.decompose(m, images(torch.float64, 40))


def test_naflexvit_max_pool_refused():
    import timm

    m = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, global_pool="avgmax", **SMALL).eval()
    with pytest.raises(UnsupportedModuleError, match="global_pool='avgmax'"):
        vd.components_for(m)


def test_respost_sub_norm_refused():
    import timm

    m = timm.create_model("vit_base_patch16_rpn_224", pretrained=False, scale_attn_norm=True, **SMALL).eval()
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.0\.attn\.norm"):
        vd.components_for(m)
