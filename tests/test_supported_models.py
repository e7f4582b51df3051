"""Every supported family (``vitdecomp.models.supported_families()``: stand-in + small-build kwargs) is
exact, and one head of each is checked against a hand-written formula.

Adding a family to the table adds it here. The hand formula needs to know the family's out-projection
and readout chain; :func:`hand_head` covers timm ``VisionTransformer``/``Eva``/``Beit``-style models
(pre- and post-norm blocks, ``attn.proj``), CaiT's class attention, Swin, MaxViT and open_clip; a
family it does not cover is skipped with the reason (extend :func:`hand_head` for it)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitdecomp as vd
from vitdecomp.models import supported_families

FAMILIES = supported_families()
# families whose heads are exact but not sums of per-source-token terms: asking for tokens must be refused
TOKENS_REFUSED = {"levit", "levit_conv"}    # LeViT: an activation between the attention and its out-projection
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@functools.lru_cache(maxsize=None)
def stand_in(family: str, dtype: torch.dtype = torch.float32) -> vd.LoadedModel:
    name, kw = FAMILIES[family]
    lm = vd.load_model(name, pretrained=False, dtype=dtype, seed=0, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # zero-initialised norm γ (Swin V2's post-norms) would make every branch vanish
        for n, p in lm.model.named_parameters():
            if ("norm" in n or n.endswith(".bn.weight")) and n.endswith("weight") and not p.any():   # + LeViT BN
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return lm


def images(lm, dtype, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *lm.image_size, generator=g, dtype=dtype)


def upstream(lm: vd.LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """The unmodified library's own readout (timm pre_logits, open_clip encode_image)."""
    with torch.inference_mode():
        if lm.library == "timm":
            return lm.model.forward_head(lm.model.forward_features(x), pre_logits=True)
        return lm.model.encode_image(x, normalize=False)     # CoCa's default normalises; CLIP's does not


def same_readout(lm, readout: torch.Tensor, z: torch.Tensor) -> bool:
    """``readout`` is the model's own: itself, or (MaxViT ``tf`` heads) before ``pre_logits``' tanh."""
    act = getattr(getattr(getattr(lm.model, "head", None), "pre_logits", None), "act", None)
    return torch.equal(readout, z) or (act is not None and torch.equal(act(readout), z))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_exact(family, dtype):
    """Reconstruction ≤ 1e-5 (fp32) / 1e-10 (fp64) at every granularity and convention, the readout is
    the upstream output itself, heads sum to the heads-off attention, tokens sum to their head."""
    lm = stand_in(family, dtype)
    x = images(lm, dtype)
    z = upstream(lm, x)
    scale = float(z.norm(dim=-1).max())
    head = [c for c in vd.components_for(lm) if c.kind == "head"][-1]
    for convention in ("centered", "uniform"):
        if family in TOKENS_REFUSED:
            with pytest.raises(vd.UnsupportedModuleError, match="per-token"):
                vd.decompose(lm, x, heads=True, convention=convention, tokens=[head.name])
        on = vd.decompose(lm, x, heads=True, convention=convention,
                          tokens=None if family in TOKENS_REFUSED else [head.name])
        off = vd.decompose(lm, x, heads=False, convention=convention)
        for d in (on, off):
            assert d.contributions.dtype == dtype
            assert same_readout(lm, d.readout, z), f"{family}: the readout must be the upstream output itself"
            err = float(d.residual().max())
            assert err <= TOL[dtype], f"{family} {convention}: relative reconstruction error {err:.2e}"
        assert family in TOKENS_REFUSED or torch.allclose(on.tokens[head.name].sum(1), on[head.name], rtol=0,
                                                          atol=TOL[dtype] * scale), \
            f"{family}: the tokens of {head.name} do not sum to the head ({convention})"
        attn = [c for c in off.components if c.kind == "attn"]
        assert attn, f"{family}: no attention component with heads=False"
        moved = torch.zeros_like(z, dtype=dtype)
        for c in attn:
            idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            assert idx, f"{family}: {c.path} has no head components"
            heads_sum = on.contributions[:, idx].sum(1)
            if convention == "uniform":    # heads carry their share of the out-projection bias
                assert torch.allclose(heads_sum, off[c.name], rtol=0, atol=TOL[dtype] * scale), \
                    f"{family}: heads of {c.path} do not sum to the heads-off attention ({convention})"
            moved = moved + off[c.name] - heads_sum
        if convention == "centered":       # split heads: the out-projection biases move to `bias`
            assert torch.allclose(moved, on["bias"] - off["bias"], rtol=0, atol=TOL[dtype] * scale), \
                f"{family}: heads + bias do not sum to the heads-off attention"


# ---------------------------------------------------------------------------------------------------
# The hand formula: the last block's one head, computed from the out-projection input and the model's
# own parameters, without the engine.

def ln_centered(norm: nn.Module, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm applied to one component ``c`` with the frozen statistics of its real input ``x``
    (both ``[..., C]``): γ ⊙ (c − mean c) / √(var x + eps), β excluded (centered convention)."""
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return norm.weight * (c - c.mean(-1, keepdim=True)) / sigma


def is_ln(m) -> bool:
    return isinstance(m, nn.LayerNorm)


def captured_inputs(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict:
    """Inputs of the named submodules in one real forward pass (forward pre-hooks)."""
    got, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_pre_hook(
            lambda _, a, p=p: got.__setitem__(p, a[0].detach().clone())))
    try:
        with torch.inference_mode():
            if hasattr(model, "encode_image"):
                model.encode_image(x)
            elif hasattr(model, "forward_head"):
                model.forward_head(model.forward_features(x), pre_logits=True)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def gain_of(block: nn.Module) -> torch.Tensor:
    """The layer-scale gain after the attention branch (1 when there is none)."""
    for name in ("ls1", "ls_1"):
        ls = getattr(block, name, None)
        if ls is not None and hasattr(ls, "gamma"):
            return ls.gamma
    g = getattr(block, "gamma_1", getattr(block, "gamma1", None))      # gamma1: XCiT class attention
    return g if isinstance(g, torch.Tensor) else torch.ones(())


def head_in_stream(model, attn_path: str, h: int, x: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]``: what head ``h`` of the timm attention at ``attn_path`` adds to the residual stream
    at each position: its slice of the out-projection input times that slice of the weight, then the
    block's layer-scale gain (the out-projection bias excluded)."""
    attn = model.get_submodule(attn_path)
    proj = attn.proj
    got = {}
    hd = proj.register_forward_pre_hook(lambda _, a: got.__setitem__("in", a[0].detach().clone()))
    try:
        with torch.inference_mode():
            model.forward_head(model.forward_features(x), pre_logits=True)
    finally:
        hd.remove()
    inp, w = got["in"], proj.weight
    if isinstance(proj, nn.Conv2d):          # CoAtNet Attention2d: a 1×1-conv out-projection on NCHW maps
        inp, w = inp.flatten(2).transpose(1, 2), proj.weight[:, :, 0, 0]
    if inp.shape[0] != x.shape[0]:
        pytest.skip(f"{attn_path}: {inp.shape[0] // x.shape[0]} windows per image; the hand formula "
                    "handles one window (build the stand-in small enough)")
    dh = w.shape[1] // attn.num_heads
    sl = slice(h * dh, (h + 1) * dh)
    u = inp.reshape(x.shape[0], -1, w.shape[1])[..., sl] @ w[:, sl].T
    parent = model.get_submodule(attn_path.rsplit(".", 1)[0]) if "." in attn_path else model
    return u * gain_of(parent)


def chain_timm_vit(model, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer / Eva / Beit / RelPos readout: norm → pool → fc_norm, frozen statistics."""
    paths = [p for p in ("norm", "fc_norm", "attn_pool") if is_ln(getattr(model, p, None)) or
             (p == "attn_pool" and getattr(model, p, None) is not None)]
    got = captured_inputs(model, paths, x)
    y = ln_centered(model.norm, u, got["norm"]) if "norm" in got else u
    if getattr(model, "attn_pool", None) is not None:
        ap = model.attn_pool
        xin = got["attn_pool"]                                       # the real (normed) stream
        B, N, C = xin.shape
        y = y[:, y.shape[1] - N:]                                    # NaFlexVit pools the patches only
        assert ap.pos_embed is None and isinstance(ap.q_norm, nn.Identity) and ap.latent_len == 1
        q = ap.q(ap.latent.expand(B, -1, -1)).reshape(B, 1, ap.num_heads, ap.head_dim).transpose(1, 2)
        kv = ap.kv(xin).reshape(B, N, 2, ap.num_heads, ap.head_dim).permute(2, 0, 3, 1, 4)
        a = ((q * ap.scale) @ kv[0].transpose(-2, -1)).softmax(-1)   # [B, Hp, 1, N], frozen
        wv = ap.kv.weight[C:]                                        # value rows, no bias
        v = (y @ wv.T).reshape(B, N, ap.num_heads, ap.head_dim).transpose(1, 2)
        o = (a @ v).transpose(1, 2).reshape(B, 1, C)
        y = (o @ ap.proj.weight.T)[:, 0]
    elif model.global_pool == "token":
        y = (y[:, 0] + y[:, 1]) / 2 if type(model).__name__ == "VisionTransformerDistilled" else y[:, 0]
    else:
        y = y[:, model.num_prefix_tokens:].mean(1)
    return ln_centered(model.fc_norm, y, got["fc_norm"]) if "fc_norm" in got else y


def chain_xcit(model, u, x):
    """XCiT: the last class-attention block's ``norm2`` (it normalises the class-token stream), then the
    final norm at the class token, both with frozen statistics."""
    n2 = f"cls_attn_blocks.{len(model.cls_attn_blocks) - 1}.norm2"
    got = captured_inputs(model, [n2, "norm"], x)
    y = ln_centered(model.get_submodule(n2), u[:, 0], got[n2][:, 0])
    return ln_centered(model.norm, y, got["norm"][:, 0])


def chain_pit(model, u, x):
    """PiT: the last stage's class-token positions (no later pooling fc), the final norm per token with frozen
    σ, then the class token (distilled: the mean of the class and distillation tokens)."""
    got = captured_inputs(model, ["norm"], x)
    T = model.cls_token.shape[1]
    y = ln_centered(model.norm, u[:, :T], got["norm"])
    return y[:, :2].mean(1) if model.head_dist is not None else y[:, 0]


def chain_swin(model, u, x):
    got = captured_inputs(model, ["norm"], x)
    xn = got["norm"].reshape(x.shape[0], -1, u.shape[-1])
    return ln_centered(model.norm, u, xn).mean(1)


def chain_swin_cr(model, u, x):
    """Swin V2-CR: the last block's ``norm3`` (its stream-replacing LayerNorm) at each position, then the
    head's mean pool."""
    n3 = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}.norm3"
    got = captured_inputs(model, [n3], x)
    return ln_centered(model.get_submodule(n3), u, got[n3]).mean(1)


def chain_maxvit(model, u, x):
    head = model.head
    if isinstance(model.norm, nn.Identity) and hasattr(head, "norm"):      # tf: pool → LN2d → fc
        got = captured_inputs(model, ["head.norm"], x)
        pooled = got["head.norm"].flatten(1)
        y = ln_centered(head.norm, u.mean(1), pooled)
        fc = getattr(head.pre_logits, "fc", None)
        return y @ fc.weight.T if fc is not None else y
    got = captured_inputs(model, ["norm"], x)                               # rw: per-position LN2d → pool
    xn = got["norm"].flatten(2).transpose(1, 2)
    return ln_centered(model.norm, u, xn).mean(1)


def chain_sam(model, u, x):
    """SAM: the neck with frozen per-position σ (1×1 conv, LayerNorm2d, 3×3 conv with zero padding,
    LayerNorm2d; or one LayerNorm2d), then the head's mean pool."""
    neck = model.neck
    paths = ["neck", "neck.1", "neck.3"] if isinstance(neck, nn.Sequential) else ["neck"]
    got = {p: t.permute(0, 2, 3, 1) for p, t in captured_inputs(model, paths, x).items()}      # NHWC
    B, H, W, _ = got["neck"].shape
    y = u.reshape(B, H, W, -1)
    if isinstance(neck, nn.Sequential):
        y = F.conv2d(y.permute(0, 3, 1, 2), neck[0].weight).permute(0, 2, 3, 1)
        y = ln_centered(neck[1], y, got["neck.1"])
        y = F.conv2d(y.permute(0, 3, 1, 2), neck[2].weight, padding=neck[2].padding).permute(0, 2, 3, 1)
        y = ln_centered(neck[3], y, got["neck.3"])
    else:
        y = ln_centered(neck, y, got["neck"])
    return y.mean((1, 2))


def open_clip_head(visual, h: int, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """open_clip: the last block's head ``h`` recomputed from ``ln_1``'s output (its MultiheadAttention
    calls its out-projection functionally), then ``ls_1``, ``ln_post`` on the class token and ``proj``."""
    i = len(visual.transformer.resblocks) - 1
    blk = visual.transformer.resblocks[i]
    got = {}
    hd = blk.ln_1.register_forward_hook(lambda _, __, out: got.__setitem__("a", out.detach().clone()))
    got.update(captured_inputs(visual, ["ln_post"], x))
    hd.remove()
    a, mha = got["a"], blk.attn
    if not visual.transformer.batch_first:
        a = a.transpose(0, 1)
    B, N, D = a.shape
    H, dh = mha.num_heads, D // mha.num_heads
    q, k, v = F.linear(a, mha.in_proj_weight, mha.in_proj_bias).split(D, -1)
    q, k, v = (t.reshape(B, N, H, dh)[:, :, h] for t in (q, k, v))
    p = ((q @ k.transpose(-2, -1)) / dh ** 0.5).softmax(-1)
    if visual.attn_pool is not None:                                      # CoCa: every position, then the pooler
        u = (p @ v) @ mha.out_proj.weight[:, h * dh:(h + 1) * dh].T * gain_of(blk)
        return f"transformer.resblocks.{i}.attn.head.{h}", coca_pooler_chain(visual, u, x)
    u = (p @ v)[:, 0] @ mha.out_proj.weight[:, h * dh:(h + 1) * dh].T       # the class token's query
    u = u * gain_of(blk)
    assert visual.pool_type == "tok" and not visual.final_ln_after_pool and visual.attn_pool is None
    xin = got["ln_post"][:, 0]
    return f"transformer.resblocks.{i}.attn.head.{h}", ln_centered(visual.ln_post, u, xin) @ visual.proj


def coca_pooler_chain(visual, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """open_clip CoCa: a per-position stream part ``u [B, N, D]`` through the ``AttentionalPooler``'s query 0
    (``ln_k`` with the frozen σ of the real last stream; the attention probabilities from the upstream
    ``MultiheadAttention`` with ``need_weights=True``; values and out-projection per pool head), then
    ``ln_post`` with the frozen statistics of the real pooled vector and ``proj``."""
    pool = visual.attn_pool
    got = captured_inputs(visual, ["attn_pool", "ln_post"], x)
    xl, post_in = got["attn_pool"], got["ln_post"][:, 0]
    with torch.inference_mode():
        kx = pool.ln_k(xl)
        q = pool.ln_q(pool.query)[None].expand(kx.shape[0], -1, -1)
        alpha = pool.attn(q, kx, kx, need_weights=True, average_attn_weights=False)[1][:, :, 0]    # [B, H, N]
    mha = pool.attn
    E, P = mha.embed_dim, mha.head_dim
    w_v = mha.in_proj_weight[2 * E:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    un = ln_centered(pool.ln_k, u, xl)
    z = sum(torch.einsum("bn,bnd->bd", alpha[:, g], un @ w_v[g * P:(g + 1) * P].T)
            @ mha.out_proj.weight[:, g * P:(g + 1) * P].T for g in range(mha.num_heads))
    return ln_centered(visual.ln_post, z, post_in) @ visual.proj


def levit_head(m, h: int, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """LeViT: the last block's head ``h``: its slice of the activation output (``proj.ln``'s input) times that
    slice of the Linear / 1×1 conv weight, × the BatchNorm's γ/√(var+eps) (its shift goes to ``bias``), then
    the head's mean over positions (no final norm)."""
    s, i = len(m.stages) - 1, len(m.stages[-1].blocks) - 1
    path = f"stages.{s}.blocks.{i}.attn"
    attn = m.get_submodule(path)
    a = captured_inputs(m, [f"{path}.proj.ln"], x)[f"{path}.proj.ln"]
    if a.dim() == 4:                                                         # use_conv: [B, C, H, W]
        a = a.flatten(2).transpose(1, 2)
    lin, bn = attn.proj.ln.linear, attn.proj.ln.bn
    w = lin.weight.reshape(lin.weight.shape[0], -1)
    sl = slice(h * attn.val_dim, (h + 1) * attn.val_dim)
    u = a[..., sl] @ w[:, sl].T * (bn.weight / torch.sqrt(bn.running_var + bn.eps))
    return f"{path}.head.{h}", u.mean(1)


def hand_head(lm, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(component name, its contribution) for head 1 of the last attention of ``lm``, by hand."""
    m = lm.model
    if lm.library == "open_clip":
        return open_clip_head(m.visual, 1, x)
    if type(m).__name__ in ("Levit", "LevitDistilled"):
        return levit_head(m, 1, x)
    head = [c for c in vd.components_for(lm) if c.kind == "head" and c.head == 1][-1]
    kind = type(m).__name__
    chains = {"VisionTransformer": chain_timm_vit, "VisionTransformerDistilled": chain_timm_vit, "Eva": chain_timm_vit,
              "Beit": chain_timm_vit, "VisionTransformerRelPos": chain_timm_vit, "Cait": chain_timm_vit,
              "SwinTransformer": chain_swin, "SwinTransformerV2": chain_swin, "SwinTransformerV2Cr": chain_swin_cr,
              "VisionTransformerSAM": chain_sam,
              "MaxxVit": chain_maxvit, "Xcit": chain_xcit, "PoolingVisionTransformer": chain_pit, "NaFlexVit": chain_timm_vit}
    if kind not in chains:
        pytest.skip(f"no hand formula for {kind}: extend hand_head() in tests/test_supported_models.py")
    try:
        m.get_submodule(head.path)
    except AttributeError:
        pytest.skip(f"{head.path} is not a module (parallel block): extend hand_head() for it")
    block = m.get_submodule(head.path.rsplit(".", 1)[0])
    post_norm = type(block).__name__ in ("ResPostRelPosBlock", "EvaBlockPostNorm",  # x + LN(attn(x))
                                         "SwinTransformerV2Block", "ResPostBlock", "SwinTransformerV2CrBlock")
    if type(m.get_submodule(head.path)).__name__ not in ("Attention", "EvaAttention", "RelPosAttention",
                                                         "WindowAttention", "WindowMultiHeadAttention", "AttentionCl",
                                                         "ClassAttn", "AttentionRope", "Attention2d"):
        pytest.skip(f"no hand formula for {type(block).__name__}/{type(m.get_submodule(head.path)).__name__}: "
                    "extend hand_head() in tests/test_supported_models.py")
    u = head_in_stream(m, head.path, 1, x)
    if post_norm:   # the branch norm with the frozen σ of the attention output at each position; the
        # out-projection bias, scaled by that 1/σ, is no constant: each head carries b_O / H of it
        attn = m.get_submodule(head.path)
        if attn.proj.bias is not None:
            u = u + attn.proj.bias / attn.num_heads
        branch = next(iter(captured_inputs(m, [f"{block_path(head.path)}.norm1"], x).values()))
        u = ln_centered(block.norm1, u, branch.reshape(u.shape[0], -1, branch.shape[-1]))   # NHWC (Swin V2)
    return head.name, chains[kind](m, u, x)


def block_path(attn_path: str) -> str:
    return attn_path.rsplit(".", 1)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_head_by_hand(family):
    """The last block's head 1 equals a hand-written direct-effect formula (fp64, centered)."""
    lm = stand_in(family, torch.float64)
    x = images(lm, torch.float64)
    name, want = hand_head(lm, x)
    got = vd.decompose(lm, x)[name]
    scale = float(upstream(lm, x).norm(dim=-1).max())
    size = float(want.norm(dim=-1).min())
    assert size > 1e-12 * scale, f"{family}: the hand-computed head is ~0; the check would be vacuous"
    err = float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())  # relative to the head itself
    assert err <= 1e-8, f"{family}: {name} differs from the hand formula (relative error {err:.2e})"
