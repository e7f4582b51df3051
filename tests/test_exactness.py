"""Exactness of the decomposition (docs/method.md “The readout chain and frozen statistics”) over every supported family, random weights."""
from __future__ import annotations

import pytest
import torch

import vitdecomp as vd
from conftest import images_for, model
from vitdecomp.models import TEST_MODELS

MODELS = TEST_MODELS  # stand-ins whose default build is small
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def upstream(lm: vd.LoadedModel, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """The unmodified library's own readout, called without vitdecomp."""
    with torch.inference_mode():
        if lm.library == "timm":
            return lm.model.forward_head(lm.model.forward_features(x), pre_logits=True)
        return lm.model.encode_image(x, normalize=normalize)


# Reconstruction at every granularity and convention, fp32 and fp64, readout = upstream and tokens
# summing to their head: tests/test_supported_models.py::test_family_is_exact, over every family.


@pytest.mark.parametrize("name", MODELS)
def test_heads_sum_to_block_and_granularity_independence(name):
    lm = model(name, torch.float64)
    x = images_for(lm, dtype=torch.float64)
    scale = float(upstream(lm, x).norm(dim=-1).max())
    on, off = (vd.decompose(lm, x, heads=h, convention="uniform") for h in (True, False))
    blocks = sorted({c.block for c in on.components if c.kind == "head"})
    for c in off.components:
        if c.kind == "attn":
            heads = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
            assert len(heads) == max(cc.head for cc in on.components if cc.path == c.path) + 1 > 1
            # uniform: heads carry their share of the out-projection bias and of the mean/beta
            assert torch.allclose(on.contributions[:, heads].sum(1), off[c.name], atol=1e-12 * scale, rtol=0)
    assert len(blocks) == sum(c.kind == "attn" for c in off.components)

    # centered: every non-attention component is independent of the granularity, and the
    # attention out-projection biases move to `bias` when heads are split.
    on, off = (vd.decompose(lm, x, heads=h) for h in (True, False))
    for c in off.components:
        if c.kind in ("embed", "mlp"):
            assert torch.allclose(on[c.name], off[c.name], atol=1e-12 * scale, rtol=0), c.name
    moved = sum(off[c.name] - on.contributions[:, [k for k, cc in enumerate(on.components)
                                                   if cc.kind == "head" and cc.path == c.path]].sum(1)
                for c in off.components if c.kind == "attn")
    assert torch.allclose(moved, on["bias"] - off["bias"], atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_normalized_readout_matches_upstream(name):
    lm = model(name)
    x = images_for(lm)
    d = vd.decompose(lm, x, normalize=True)
    z = upstream(lm, x)
    assert torch.allclose(d.readout, z / z.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(d.readout.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert float(d.residual().max()) <= 1e-5
    if lm.library == "open_clip":
        assert torch.allclose(d.readout, upstream(lm, x, normalize=True), atol=1e-6)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(amp):
    lm = model("timm:deit_tiny_patch16_224")
    x = images_for(lm)
    with torch.autocast("cpu", dtype=amp):
        d = vd.decompose(lm, x)
        z = upstream(lm, x)
    assert d.contributions.dtype == torch.float32
    assert torch.allclose(d.readout, z.float())
    # the forward itself ran in half precision; the decomposition of *that* forward is exact
    # up to the half-precision rounding of the captured activations
    assert float(d.residual().max()) < 3e-2


def test_block_subset_folds_into_embed():
    lm = model("timm:vit_base_patch16_clip_224")
    x = images_for(lm)
    d = vd.decompose(lm, x, blocks=range(7, 12))
    kinds = [c.kind for c in d.components]
    assert (kinds.count("embed"), kinds.count("head"), kinds.count("mlp"), kinds.count("bias")) == (1, 60, 5, 1)
    assert d.names[1] == "blocks.7.attn.head.0" and d.names[-2] == "blocks.11.mlp"
    assert float(d.residual().max()) <= 1e-5
    full = vd.decompose(lm, x)
    # later blocks' components do not depend on how many earlier blocks are decomposed
    assert torch.allclose(d["blocks.9.attn.head.4"], full["blocks.9.attn.head.4"], atol=1e-6)
    folded = sum(full[c.name] for c in full.components if c.kind != "bias" and (c.block is None or c.block < 7))
    bias_shift = full["bias"] - d["bias"]
    assert torch.allclose(d["embed"], folded + bias_shift, atol=1e-5)


def test_fused_and_unfused_attention_agree():
    lm = model("timm:deit_tiny_patch16_224")
    x = images_for(lm)
    assert all(b.attn.fused_attn for b in lm.model.blocks), "timm should use its fused kernel by default"
    fused = vd.decompose(lm, x)
    try:
        for b in lm.model.blocks:
            b.attn.fused_attn = False
        plain = vd.decompose(lm, x)
    finally:
        for b in lm.model.blocks:
            b.attn.fused_attn = True
    assert torch.allclose(fused.contributions, plain.contributions, atol=1e-6)


def test_parameters_with_grad_and_sequence_first_open_clip():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=48, layers=3, heads=4, mlp_ratio=2.0,
                            output_dim=16, ls_init_value=0.5).eval()
    # the sequence-first layout of older open_clip releases: (N, B, D) through the blocks
    vit.transformer.batch_first = False
    for blk in vit.transformer.resblocks:
        blk.attn.batch_first = False
    assert any(p.requires_grad for p in vit.parameters())
    x = torch.randn(3, 3, 32, 32)
    d = vd.decompose(vit, x, tokens=["transformer.resblocks.1.attn.head.2"])
    with torch.inference_mode():
        z = vit(x)
    assert torch.equal(d.readout, z)
    assert float(d.residual().max()) <= 1e-5
    assert d.token_map("transformer.resblocks.1.attn.head.2").shape == (3, 4, 4, 16)


VARIANTS = {
    "qk_norm+sub_norms+layerscale": dict(qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True, init_values=0.3),
    "avg_pool+fc_norm+registers": dict(global_pool="avg", fc_norm=True, reg_tokens=2, class_token=True),
    "avg_pool_no_cls+pre_norm": dict(global_pool="avg", class_token=False, pre_norm=True, fc_norm=True),
    "rmsnorm+no_qkv_bias": dict(norm_layer="rmsnorm", qkv_bias=False, proj_bias=False),
    "dynamic_img_size": dict(dynamic_img_size=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_timm_vit_variants(variant):
    """Rule coverage beyond the named models: every supported switch of timm's VisionTransformer."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = VARIANTS[variant]
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=5, **kw)
    with torch.no_grad():                          # non-trivial norm affines and LayerScale gains
        for name, p in m.named_parameters():
            if "norm" in name or "ls" in name:
                p.add_(0.3 * torch.randn_like(p))
    m = m.double().eval()
    size = (48, 40) if kw.get("dynamic_img_size") else (32, 32)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.inference_mode():
        z = m.forward_head(m.forward_features(x), pre_logits=True)
    name = "blocks.1.attn.head.2"
    for heads in (True, False):
        for convention in ("centered", "uniform"):
            d = vd.decompose(m, x, heads=heads, convention=convention, tokens=[name] if heads else None)
            assert torch.equal(d.readout, z)
            assert float(d.residual().max()) <= 1e-10, (variant, heads, convention, float(d.residual().max()))
            if heads:
                torch.testing.assert_close(d.tokens[name].sum(1), d[name], rtol=0, atol=1e-12)
    if kw.get("dynamic_img_size"):
        assert d.grid == (6, 5)
