"""One rule registry for every family: a user's attention rule is used in a CLS-readout ViT, an
attention-pool ViT (per-position readout) and a Swin-like model; a subclass without a rule is refused
with its path; a wrapper model rule adds readout maps to either plan kind with ``with_post``."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import vitdecomp as vd
from timm.layers import Attention
from timm.models.cait import ClassAttn
from vitdecomp.engine.rules import RuleContext, register_rule
from vitdecomp.engine.rules.attention import TimmAttention
from vitdecomp.errors import UnsupportedModuleError

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SWIN = dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))


class MyAttention(Attention):
    """A user's attention: same maths as timm's, written out (explicit softmax), and it accepts
    Swin's window ``mask`` [nW, N, N] as well as ``attn_mask``."""

    def forward(self, x, attn_mask=None, is_causal=False, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.num_heads, N, N) + mask[None, :, None]).view(-1, self.num_heads, N, N)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(self.norm(out))


class Unruled(MyAttention):
    """Overrides forward and has no rule of its own: must be refused, not silently mis-decomposed."""

    def forward(self, x, attn_mask=None, is_causal=False, mask=None):
        return super().forward(x, attn_mask=attn_mask, mask=mask) * 2.0


USED: list[str] = []


@register_rule("attention", MyAttention)
class MyAttentionRule(TimmAttention):
    def __init__(self, path, module):
        super().__init__(path, module)
        USED.append(path)


def _swap(parent: nn.Module, cls=MyAttention) -> None:
    """Replace ``parent.attn`` by ``cls`` with the same qkv / proj weights."""
    old = parent.attn
    dim, heads = old.qkv.in_features, old.num_heads
    new = cls(dim, num_heads=heads, qkv_bias=old.qkv.bias is not None).to(old.qkv.weight.dtype)
    with torch.no_grad():
        new.qkv.load_state_dict(old.qkv.state_dict())
        new.proj.load_state_dict(old.proj.state_dict())
    parent.attn = new.eval()


def _perturb(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return m


@functools.lru_cache(maxsize=None)
def model(kind: str, dtype=torch.float32, cls=MyAttention):
    import timm

    torch.manual_seed(0)
    if kind == "vit":            # CLS readout: static weighting
        m = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3)
        parents = list(m.blocks)
    elif kind == "siglip":       # attention-pool readout: per-position weights
        m = timm.create_model("vit_base_patch16_siglip_224", img_size=64, depth=2, embed_dim=64, num_heads=4)
        parents = list(m.blocks)
    else:                        # Swin-like: shifted windows, patch merging, the user's attention
        m = timm.create_model("swin_tiny_patch4_window7_224", **SWIN)
        parents = [b for st in m.layers for b in st.blocks]
    _perturb(m)
    original = None
    if kind == "vit":
        original = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3)
        original.load_state_dict(m.state_dict())
        original = original.to(dtype).eval()
    for p in parents:
        _swap(p, cls)
    return m.to(dtype).eval(), original


def images(kind, dtype):
    size = 224 if kind == "swin" else 64
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def upstream(m, x):
    with torch.inference_mode():
        return m.forward_head(m.forward_features(x), pre_logits=True)


FIRST_ATTN = {"vit": "blocks.1.attn", "siglip": "blocks.1.attn", "swin": "layers.2.blocks.1.attn"}


@pytest.mark.parametrize("kind", ["vit", "siglip", "swin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_user_attention_rule_is_used_in_every_family(kind, dtype):
    m, _ = model(kind, dtype)
    x = images(kind, dtype)
    z = upstream(m, x)
    assert not torch.allclose(z, torch.zeros_like(z))
    USED.clear()
    tok = FIRST_ATTN[kind] + ".head.1"
    on = vd.decompose(m, x, tokens=[tok])
    assert FIRST_ATTN[kind] in USED                       # the user's rule, not a built-in one
    assert torch.equal(on.readout, z)
    assert float(on.residual().max()) <= TOL[dtype]
    scale = float(z.norm(dim=-1).max())
    torch.testing.assert_close(on.tokens[tok].sum(1), on[tok], rtol=0, atol=TOL[dtype] * scale)
    off = vd.decompose(m, x, heads=False)
    assert float(off.residual().max()) <= TOL[dtype]
    heads = [k for k, c in enumerate(on.components) if c.kind == "head" and c.path == FIRST_ATTN[kind]]
    assert len(heads) >= 2
    # under "uniform" the out-projection bias is shared by the heads: they sum to the attention layer
    u_on = vd.decompose(m, x, convention="uniform")
    u_off = vd.decompose(m, x, heads=False, convention="uniform")
    torch.testing.assert_close(u_on.contributions[:, heads].sum(1), u_off[FIRST_ATTN[kind]],
                               rtol=0, atol=TOL[dtype] * scale)


def test_user_rule_in_vit_matches_the_builtin_rule_on_the_original_model():
    """The ViT with the user's attention computes the same function as the original ViT, so every
    component must equal the built-in decomposition of the original (independent rule, same maths)."""
    m, original = model("vit", torch.float64)
    x = images("vit", torch.float64)
    mine, ref = vd.decompose(m, x), vd.decompose(original, x)
    assert mine.names == ref.names
    torch.testing.assert_close(mine.contributions, ref.contributions, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["vit", "siglip", "swin"])
def test_attention_subclass_without_rule_is_refused_with_its_path(kind):
    m, _ = model(kind, torch.float32, Unruled)
    path = {"vit": r"blocks\.0\.attn", "siglip": r"blocks\.0\.attn", "swin": r"layers\.0\.blocks\.0\.attn"}[kind]
    with pytest.raises(UnsupportedModuleError, match=path + r".*Unruled.*register_rule"):
        vd.components_for(m)


class Wrapped(nn.Module):
    """A wrapper tower: the trunk's readout, then a projection (like open_clip's TimmModel head)."""

    def __init__(self, trunk: nn.Module, dim_out: int = 24):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.num_features, dim_out)

    def forward(self, x):
        return self.head(self.trunk.forward_head(self.trunk.forward_features(x), pre_logits=True))


@register_rule("model", Wrapped)
def wrapped_rule(m: Wrapped):
    from vitdecomp.engine.rules.affine import PostOp
    from vitdecomp.engine.rules.models import plan_for, with_post

    return with_post(plan_for(m.trunk), [PostOp("head", weight=m.head.weight, bias=m.head.bias)],
                     readout=lambda x: m(x), family="wrapped")


@pytest.mark.parametrize("kind", ["vit", pytest.param("swin", marks=pytest.mark.slow)])
def test_with_post_appends_readout_maps_to_both_plan_kinds(kind):
    m, _ = model(kind, torch.float64)
    torch.manual_seed(3)
    w = Wrapped(m).to(torch.float64).eval()
    x = images(kind, torch.float64)
    with torch.inference_mode():
        z = w(x)
    for convention in ("uniform", "centered"):
        d = vd.decompose(w, x, convention=convention)
        assert torch.equal(d.readout, z) and d.contributions.shape[-1] == 24
        assert float(d.residual().max()) <= 1e-10
    # linear part: every non-bias component is the trunk's component times W (bias gets W·b + b_head)
    inner = vd.decompose(m, x)
    k = d.names.index(FIRST_ATTN[kind] + ".head.0")
    torch.testing.assert_close(d.contributions[:, k], inner.contributions[:, k] @ w.head.weight.detach().T, rtol=0, atol=1e-10)


def test_rule_context_is_public_and_documented():
    import dataclasses

    import vitdecomp.engine as engine
    from vitdecomp.engine.rules import affine, spatial

    assert engine.RuleContext is RuleContext and dataclasses.is_dataclass(RuleContext)
    fields = {f.name for f in dataclasses.fields(RuleContext)}
    assert fields == {"pooling", "dtype", "heads", "layout", "wanted_tokens"}
    for name in fields:
        assert f"``{name}``" in RuleContext.__doc__
    ctx = RuleContext(None, torch.float32, True, "NBD", {"a": [1]})
    assert ctx.token_heads("a") == [1] and ctx.token_heads("b") == []
    assert ctx.to_bnd(torch.zeros(5, 2, 3)).shape == (2, 5, 3)
    # one implementation of the norm statistics and of the centring
    assert not hasattr(spatial, "ln_stats") and not hasattr(spatial, "center")
    x = torch.randn(4, 7, dtype=torch.float64)
    mu, sigma = affine.layernorm_stats(x, affine.NormSpec("layernorm", eps=1e-6))
    torch.testing.assert_close(mu[:, 0], x.mean(-1))
    torch.testing.assert_close(sigma[:, 0], (x.var(-1, unbiased=False) + 1e-6).sqrt())


class MyClassAttn(ClassAttn):
    """CaiT's class attention, as a user's subclass (same computation, its own forward)."""

    def forward(self, x):
        return super().forward(x)


def test_cait_class_attention_resolves_through_the_registry():
    """CaiT's class-attention blocks are found along the MRO like every other block: a subclass without a
    rule is refused with its path; once registered, its values equal the built-in rule's."""
    import timm
    from vitdecomp.engine.rules.attention import _PositionsOnly
    from vitdecomp.engine.rules.registry import _RULES

    torch.manual_seed(0)
    m = timm.create_model("cait_xxs24_224", pretrained=False, embed_dim=48, num_heads=3, depth=2, img_size=48,
                          depth_token_only=2).double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = vd.decompose(m, x)
    old = m.blocks_token_only[1].attn
    new = MyClassAttn(48, num_heads=3, qkv_bias=True).double().eval()
    new.load_state_dict(old.state_dict())
    m.blocks_token_only[1].attn = new
    with pytest.raises(UnsupportedModuleError, match=r"blocks_token_only\.1\.attn.*MyClassAttn"):
        vd.decompose(m, x)
    register_rule("attention", MyClassAttn)(
        lambda path, mod: _PositionsOnly(path, mod, mod.num_heads, mod.proj.in_features // mod.num_heads))
    try:
        d = vd.decompose(m, x)
    finally:
        _RULES["attention"].pop(MyClassAttn)
    assert d.names == ref.names
    torch.testing.assert_close(d.contributions, ref.contributions, rtol=0, atol=1e-12)
