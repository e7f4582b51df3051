"""ViT variants (vitdecomp/engine/rules/vit_variants.py): DeiT distilled, BEiT, CaiT, RelPos ViT,
post-norm blocks (RelPos ``ResPostRelPosBlock``, ``EvaBlockPostNorm``), differential attention
(SAM ViT: tests/test_families_sam.py).

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
from vitdecomp.errors import UnsupportedModuleError

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SMALL = dict(embed_dim=48, num_heads=3, depth=2, img_size=48)
FAMILIES = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(SMALL)),
    "beit": ("beit_base_patch16_224", dict(SMALL)),                       # own rel-pos tables, LayerScale, avg
    "beit_shared_token": ("beit_base_patch16_224", dict(SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                         global_pool="token", use_fc_norm=False)),
    "beit_gap": ("beit_base_patch16_224", dict(SMALL, use_fc_norm=False)),  # per-token norm, then mean pool
    "beitv2": ("beitv2_base_patch16_224", dict(SMALL)),
    "cait": ("cait_xxs24_224", dict(SMALL, depth_token_only=2)),
    "vit_relpos": ("vit_relpos_small_patch16_224", dict(SMALL)),
    "vit_relpos_cls": ("vit_relpos_base_patch16_cls_224", dict(SMALL)),
    "vit_srelpos_gap": ("vit_srelpos_small_patch16_224", dict(SMALL)),      # shared rel-pos, per-token norm + mean
    "vit_relpos_respost": ("vit_relpos_base_patch16_rpn_224", dict(SMALL, fc_norm=True)),
    "vit_relpos_respost_gap": ("vit_relpos_base_patch16_rpn_224", dict(SMALL)),  # post-norm + per-token norm
    "eva_post_norm": ("eva02_small_patch14_224", dict(depth=2, img_size=42, use_post_norm=True)),
    "vit_diff": ("vit_dwee_patch16_reg1_gap_256", dict(SMALL)),
    "parallel_scaling": ("vit_base_patch16_xp_224", dict(SMALL, init_values=0.5)),       # RmsNorm, q/k norms
    "diff_parallel_scaling": ("vit_dpwee_patch16_reg1_gap_256", dict(SMALL)),              # fused out-projection
    "parallel_things": ("vit_small_patch16_18x2_224", dict(SMALL, init_values=0.5)),       # two attentions, two MLPs
}


@functools.lru_cache(maxsize=None)
def build(family: str, dtype=torch.float32):
    import timm

    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw)
    with torch.no_grad():        # non-trivial norm affines, biases, gains, relative position tables, λ
        for n, p in m.named_parameters():
            if any(s in n for s in ("norm", "gamma", "bias", "relative_position", "rel_pos", "lambda", "ls")):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval().requires_grad_(False)


def images(m, dtype):
    return torch.randn(2, 3, *m.patch_embed.img_size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


def last_head(m) -> str:
    return [c.name for c in vd.components_for(m) if c.kind == "head"][-1]


# configuration variants of a family already covered: their fp32 case runs with the slow tests
VARIANTS = {"beit_shared_token", "beit_gap", "vit_relpos_cls", "vit_srelpos_gap", "vit_relpos_respost_gap",
            "diff_parallel_scaling"}
CASES = [pytest.param(f, dt, id=f"{f}-{tag}", marks=[pytest.mark.slow] if f in VARIANTS and tag == "fp32" else [])
         for f in FAMILIES for dt, tag in ((torch.float32, "fp32"), (torch.float64, "fp64"))]


@pytest.mark.parametrize("family,dtype", CASES)
def test_reconstruction_readout_and_tokens(family, dtype):
    m = build(family, dtype)
    x = images(m, dtype)
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
    x = images(m, torch.float64)
    on, off = vd.decompose(m, x, convention="uniform"), vd.decompose(m, x, heads=False, convention="uniform")
    paths = sorted({c.path for c in on.components if c.kind == "head"})
    assert paths and all(p in off.names for p in paths)
    for p in paths:
        heads = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == p]
        torch.testing.assert_close(on.contributions[:, heads].sum(1), off[p], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["deit_distilled", "cait", "vit_relpos_respost_gap", "parallel_things"])
def test_blocks_option_folds_earlier_blocks_into_embed(family):
    m = build(family, torch.float64)
    x = images(m, torch.float64)
    d = vd.decompose(m, x, blocks=[-1])
    assert float(d.residual().max()) <= 1e-10
    from vitdecomp.engine import block_paths

    assert {c.block for c in d.components if c.block is not None} == {len(block_paths(m)) - 1}


def test_distilled_keeps_only_the_readout_positions(monkeypatch):
    """DeiT distilled reads positions 0 and 1 only: the engine stores those two positions of every branch
    output (all positions for a unit whose token map is asked for), and the result stays exact."""
    import vitdecomp.engine.engine as E

    m = build("deit_distilled", torch.float64)
    x = images(m, torch.float64)
    seen, orig = {}, E._assemble

    def spy(plan, comps, units, store, *args, **kw):
        seen.update({u.name: store[u.name].shape[1] for u in units})
        seen["embed"] = store["embed"].shape[1]
        return orig(plan, comps, units, store, *args, **kw)

    monkeypatch.setattr(E, "_assemble", spy)
    name = last_head(m)
    attn = name.rsplit(".head.", 1)[0]
    d = vd.decompose(m, x, tokens=[name])
    n = m.patch_embed.num_patches + m.num_prefix_tokens
    assert seen.pop(attn) == n and set(seen.values()) == {2}
    assert float(d.residual().max()) <= 1e-10
    torch.testing.assert_close(d.tokens[name].sum(1), d[name], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ hand-written heads
def _capture(m, modules: dict):
    """Run the model once; return each module's (input, kwargs, output)."""
    seen, hooks = {}, []
    for key, mod in modules.items():
        hooks.append(mod.register_forward_pre_hook(
            lambda _, a, kw, key=key: seen.__setitem__(key + ".in", (a, kw)), with_kwargs=True))
        hooks.append(mod.register_forward_hook(lambda _, a, out, key=key: seen.__setitem__(key + ".out", out)))
    return seen, hooks


def _run(m, x, modules):
    seen, hooks = _capture(m, modules)
    try:
        with torch.inference_mode():
            m.forward_head(m.forward_features(x), pre_logits=True)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _ln_lin(norm, u, stream):
    """Linear part of a LayerNorm with σ frozen at ``stream``: γ ⊙ (u − mean u) / σ(stream)."""
    sigma = torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return norm.weight * (u - u.mean(-1, keepdim=True)) / sigma


def _head_out(q, k, v, h, dh, scale, bias=None):
    """Head ``h``'s attention output per query ``[B, N, dh]`` from full q, k, v ``[B, N, H·dh]``."""
    sl = slice(h * dh, (h + 1) * dh)
    s = q[..., sl] @ k[..., sl].transpose(1, 2) * scale
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v[..., sl]


def _qkv_head(a, qkv, h, bias=None):
    """Head ``h`` of a fused-qkv attention ``a`` from its ``qkv [B, N, 3·D]``, out-projected (no gain): ``[B, N, D]``."""
    D = qkv.shape[-1] // 3
    dh = D // a.num_heads
    o = _head_out(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], h, dh, dh ** -0.5, bias)
    return o @ a.proj.weight[:, h * dh:(h + 1) * dh].T


def _ls(mod):
    """A timm LayerScale's γ, or 1 for ``nn.Identity``."""
    return mod.gamma if hasattr(mod, "gamma") else 1.0


def _linear(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


def _check(d, name, expect):
    got = d[name]
    assert float(expect.norm()) > 1e-4 * float(d.readout.norm())
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-11)


def test_deit_distilled_head_by_hand():
    """z = (LN(x)[cls] + LN(x)[dist])/2: head h of the last block at the two readout tokens, each through
    the final norm with its own σ."""
    m = build("deit_distilled", torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 1
    a = blk.attn
    seen = _run(m, x, {"attn": a, "norm": m.norm})
    c = _qkv_head(a, _linear(seen["attn.in"][0][0], a.qkv), h) * _ls(blk.ls1)   # [B, N, D]
    xf = seen["norm.in"][0][0]
    expect = (_ln_lin(m.norm, c[:, 0], xf[:, 0]) + _ln_lin(m.norm, c[:, 1], xf[:, 1])) / 2
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


@pytest.mark.parametrize("family", ["beit", "beit_shared_token", "beit_gap"])
def test_beit_head_by_hand(family):
    """BEiT: softmax(q·k/√dh + B_rel) v, B_rel from the table indexed by the relative position index
    (own and/or shared), times γ1, pooled (mean of patches or CLS) through fc_norm / norm."""
    m = build(family, torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 2
    a = blk.attn
    seen = _run(m, x, {"attn": a, "last": blk, "norm": m.norm})
    y = seen["attn.in"][0][0]
    N = y.shape[1]
    qkv = y @ a.qkv.weight.T + torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
    bias = torch.zeros(N, N, dtype=y.dtype)
    for table, index in ((getattr(a, "relative_position_bias_table", None), getattr(a, "relative_position_index", None)),
                         ((m.rel_pos_bias.relative_position_bias_table, m.rel_pos_bias.relative_position_index)
                          if m.rel_pos_bias is not None else (None, None))):
        if table is not None:
            bias = bias + table[index.view(-1), h].view(N, N)
    c = _qkv_head(a, qkv, h, bias) * blk.gamma_1
    if m.global_pool == "avg" and family == "beit_gap":                         # each patch through its own σ
        expect = _ln_lin(m.norm, c[:, 1:], seen["norm.in"][0][0][:, 1:]).mean(1)
    elif m.global_pool == "avg":
        expect = _ln_lin(m.fc_norm, c[:, 1:].mean(1), seen["last.out"][:, 1:].mean(1))
    else:
        expect = _ln_lin(m.norm, c[:, 0], seen["norm.in"][0][0][:, 0])
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


def test_cait_class_attention_head_by_hand():
    """CaiT: the class token's query over [class token, patches] (normed), times the class-attention
    block's own LayerScale γ1, through the final norm at the class token."""
    m = build("cait", torch.float64)
    x = images(m, torch.float64)
    i, h = len(m.blocks_token_only) - 1, 1
    blk = m.blocks_token_only[i]
    a = blk.attn
    seen = _run(m, x, {"attn": a, "norm": m.norm})
    u = seen["attn.in"][0][0]                                                   # norm1([x_cls, x])
    D, H = u.shape[-1], a.num_heads
    dh = D // H
    q, k, v = (u @ p.weight.T + (p.bias if p.bias is not None else 0) for p in (a.q, a.k, a.v))
    o = _head_out(q[:, :1], k, v, h, dh, dh ** -0.5)                            # [B, 1, dh]
    c = (o[:, 0] @ a.proj.weight[:, h * dh:(h + 1) * dh].T) * blk.gamma_1
    expect = _ln_lin(m.norm, c, seen["norm.in"][0][0][:, 0])
    d = vd.decompose(m, x)
    _check(d, f"blocks_token_only.{i}.attn.head.{h}", expect)
    assert not any(c.path.startswith("blocks.") for c in d.components)        # self-attention blocks: no direct effect


def test_relpos_head_by_hand():
    m = build("vit_relpos", torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 0
    a = blk.attn
    seen = _run(m, x, {"attn": a, "last": blk})
    c = _qkv_head(a, _linear(seen["attn.in"][0][0], a.qkv), h, a.rel_pos.get_bias()[0, h]) * _ls(blk.ls1)
    npt = m.num_prefix_tokens
    expect = _ln_lin(m.fc_norm, c[:, npt:].mean(1), seen["last.out"][:, npt:].mean(1))
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


@pytest.mark.parametrize("family", ["vit_relpos_respost", "vit_relpos_respost_gap", "eva_post_norm"])
def test_post_norm_head_by_hand(family):
    """Post-norm block ``x + LN1(attn(x))``: head h's share is γ1 ⊙ C(o_h W_O,hᵀ + b_O/H)/σ_q per query
    (σ_q of the whole attention output), then mean over patches through fc_norm."""
    m = build(family, torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 1
    a = blk.attn
    seen = _run(m, x, {"attn": a, "proj": a.proj, "last": blk, "norm": m.norm})
    o_all = seen["proj.in"][0][0]                                               # heads' attention outputs
    y = seen["attn.out"]                                                        # attention output (LN1 input)
    H = a.num_heads
    dh = o_all.shape[-1] // H
    if family == "vit_relpos_respost":                                          # recompute o_h by hand
        xin = seen["attn.in"][0][0]
        D = xin.shape[-1]
        qkv = _linear(xin, a.qkv)
        o = _head_out(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], h, dh, dh ** -0.5, a.rel_pos.get_bias()[0, h])
        torch.testing.assert_close(o, o_all[..., h * dh:(h + 1) * dh], rtol=0, atol=1e-12)
    else:
        o = o_all[..., h * dh:(h + 1) * dh]                                     # rotary heads: tests/test_families_eva.py
    c = o @ a.proj.weight[:, h * dh:(h + 1) * dh].T + a.proj.bias / H
    n1 = blk.norm1
    sigma = torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + n1.eps)
    t = n1.weight * (c - c.mean(-1, keepdim=True)) / sigma                      # per query, β excluded
    npt = m.num_prefix_tokens
    if isinstance(m.norm, torch.nn.Identity):
        expect = _ln_lin(m.fc_norm, t[:, npt:].mean(1), seen["last.out"][:, npt:].mean(1))
    else:                                                                       # per-token final norm, then mean
        expect = _ln_lin(m.norm, t[:, npt:], seen["norm.in"][0][0][:, npt:]).mean(1)
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


def test_diff_attention_head_by_hand():
    """DiffAttention: (softmax(q1k1ᵀ/√dh) − λ softmax(q2k2ᵀ/√dh)) v, RMS-normed per head over 2·dh
    channels, times (1 − λ_init), projected, mean over patches through fc_norm."""
    m = build("vit_diff", torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 2
    a = blk.attn
    seen = _run(m, x, {"attn": a, "last": blk})
    y = seen["attn.in"][0][0]
    D, H = y.shape[-1], a.num_heads
    dh = D // H // 2
    q, k, v = _linear(y, a.qkv).chunk(3, -1)
    # λ as the module computes it: exponentials in float32, then cast to the activations' dtype
    lam = (torch.exp((a.lambda_q1 * a.lambda_k1).sum().float()) - torch.exp((a.lambda_q2 * a.lambda_k2).sum().float())
           + a.lambda_init).to(y.dtype)
    q1, q2 = q[..., 2 * h * dh:(2 * h + 1) * dh], q[..., (2 * h + 1) * dh:(2 * h + 2) * dh]
    k1, k2 = k[..., 2 * h * dh:(2 * h + 1) * dh], k[..., (2 * h + 1) * dh:(2 * h + 2) * dh]
    att = (q1 @ k1.transpose(1, 2) / dh ** 0.5).softmax(-1) - lam * (q2 @ k2.transpose(1, 2) / dh ** 0.5).softmax(-1)
    mixed = att @ v[..., 2 * h * dh:(2 * h + 2) * dh]
    sub = a.sub_norm
    o = sub.weight * mixed / torch.sqrt(mixed.pow(2).mean(-1, keepdim=True) + sub.eps) * (1 - a.lambda_init)
    c = (o @ a.proj.weight[:, 2 * h * dh:(2 * h + 2) * dh].T) * _ls(blk.ls1)
    npt = m.num_prefix_tokens
    expect = _ln_lin(m.fc_norm, c[:, npt:].mean(1), seen["last.out"][:, npt:].mean(1))
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


def _rms_lin(norm, u, stream):
    """Linear part of an RMSNorm with σ frozen at ``stream``: γ ⊙ u / σ(stream)."""
    return norm.weight * u / torch.sqrt(stream.pow(2).mean(-1, keepdim=True) + norm.eps)


@pytest.mark.parametrize("family", ["parallel_scaling", "diff_parallel_scaling"])
def test_parallel_scaling_head_by_hand(family):
    """ViT-22B-style block: q, k, v (and the MLP's first layer) from one in-projection of in_norm(x);
    head h's attention output through the attention slice of the out-projection, times the block's
    LayerScale, read out at the class token (RmsNorm) or as the patch mean through fc_norm."""
    m = build(family, torch.float64)
    x = images(m, torch.float64)
    blk, h = m.blocks[-1], 1
    seen = _run(m, x, {"blk": blk, "norm": m.norm})
    xin = seen["blk.in"][0][0]
    y = _linear(blk.in_norm(xin), blk.in_proj)
    _, q, k, v = torch.split(y, blk.in_split, dim=-1)
    B, N, D = xin.shape
    H = blk.num_heads
    if family == "parallel_scaling":
        dh = D // H
        sl = slice(h * dh, (h + 1) * dh)
        o = torch.softmax(blk.q_norm(q[..., sl]) @ blk.k_norm(k[..., sl]).transpose(1, 2) / dh ** 0.5, -1) @ v[..., sl]
        c = o @ blk.attn_out_proj.weight[:, sl].T * _ls(blk.ls)
        npt = 0
    else:
        dh = D // H // 2
        sl1, sl2, slv = slice(2 * h * dh, (2 * h + 1) * dh), slice((2 * h + 1) * dh, (2 * h + 2) * dh), slice(2 * h * dh, (2 * h + 2) * dh)
        lam = (torch.exp((blk.lambda_q1 * blk.lambda_k1).sum().float()) - torch.exp((blk.lambda_q2 * blk.lambda_k2).sum().float())
               + blk.lambda_init).to(xin.dtype)
        sm = [torch.softmax(blk.q_norm(q[..., s_]) @ blk.k_norm(k[..., s_]).transpose(1, 2) / dh ** 0.5, -1) for s_ in (sl1, sl2)]
        mixed = (sm[0] - lam * sm[1]) @ v[..., slv]
        o = blk.sub_norm.weight * mixed / torch.sqrt(mixed.pow(2).mean(-1, keepdim=True) + blk.sub_norm.eps) * (1 - blk.lambda_init)
        c = o @ blk.out_proj.weight[:, slv].T * _ls(blk.ls)                     # the attention slice of the fused proj
        npt = m.num_prefix_tokens
    if m.global_pool == "token":
        expect = _rms_lin(m.norm, c[:, 0], seen["norm.in"][0][0][:, 0])
    else:
        expect = _ln_lin(m.fc_norm, c[:, npt:].mean(1), seen["blk.out"][:, npt:].mean(1))
    _check(vd.decompose(m, x), f"blocks.{len(m.blocks) - 1}.attn.head.{h}", expect)


def test_parallel_things_head_by_hand():
    """Two parallel attentions: head k = i·H + h is head h of ``attns.<i>.attn`` on ``attns.<i>.norm(x)``,
    times that branch's LayerScale, at the class token through the final norm."""
    m = build("parallel_things", torch.float64)
    x = images(m, torch.float64)
    blk, i, h = m.blocks[-1], 1, 2
    br = blk.attns[i]
    a = br.attn
    seen = _run(m, x, {"attn": a, "norm": m.norm})
    H = a.num_heads
    c = _qkv_head(a, _linear(seen["attn.in"][0][0], a.qkv), h) * _ls(br.ls)
    expect = _ln_lin(m.norm, c[:, 0], seen["norm.in"][0][0][:, 0])
    d = vd.decompose(m, x)
    _check(d, f"blocks.{len(m.blocks) - 1}.attns.head.{i * H + h}", expect)
    assert f"blocks.{len(m.blocks) - 1}.ffns" in d.names


def test_parallel_blocks_in_a_per_position_readout_refused():
    import timm

    m = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, depth=1, embed_dim=48, num_heads=3,
                          img_size=32, global_pool="avg", fc_norm=False).eval()
    with pytest.raises(UnsupportedModuleError, match="blocks.0"):
        vd.components_for(m)
