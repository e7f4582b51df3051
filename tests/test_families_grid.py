"""Any grid size: DINOv2 at 518 px (37×37 patches), register tokens dropped from token maps,
non-square inputs where the model allows them."""
from __future__ import annotations

import pytest
import torch

import vitdecomp as vd


def dinov2(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, depth=2, **kw).double().eval()


@pytest.mark.parametrize("size,grid", [((518, 518), (37, 37)), ((518, 392), (37, 28))], ids=["518", "518x392"])
def test_dinov2_registers_any_grid(size, grid):
    m = dinov2(dynamic_img_size=True)
    assert m.num_prefix_tokens == 5                         # class token + 4 registers
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    name = "blocks.1.attn.head.3"
    d = vd.decompose(m, x, tokens=[name])
    with torch.inference_mode():
        assert torch.equal(d.readout, m.forward_head(m.forward_features(x), pre_logits=True))
    assert float(d.residual().max()) <= 1e-10
    tm = d.token_map(name)
    assert tm.shape == (1, *grid, 384)
    gh, gw = grid
    # registers (positions 1..4) and the class token are not in the map; patch (i, j) is row-major
    assert torch.equal(tm[:, 5, 7], d.tokens[name][:, 5 + 5 * gw + 7])
    assert torch.equal(tm[:, gh - 1, gw - 1], d.tokens[name][:, -1])
    prefix = d.tokens[name][:, :5].sum(1)
    torch.testing.assert_close(tm.sum((1, 2)) + prefix, d[name], rtol=0, atol=1e-12)


def test_fixed_size_model_refuses_other_sizes_with_a_clear_error():
    m = dinov2()
    with pytest.raises(vd.errors.InputError, match="expects"):
        vd.decompose(m, torch.randn(1, 3, 224, 224, dtype=torch.float64))


def test_hybrid_stem_grid_and_any_multiple_of_its_stride():
    """ViTamin without position embedding (as `vitamin_xlarge_*`): a convolutional stem (timm HybridEmbed,
    16 px per token), so
    the model takes any multiple of its stride; the token grid is timm's own ``dynamic_feat_size``."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vitamin_small_224", pretrained=False, depth=2, pos_embed="none").double().eval()
    assert m.pos_embed is None
    x = torch.randn(1, 3, 96, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    name = "blocks.1.attn.head.2"
    d = vd.decompose(m, x, tokens=[name])
    with torch.inference_mode():
        assert torch.equal(d.readout, m.forward_head(m.forward_features(x), pre_logits=True))
    assert float(d.residual().max()) <= 1e-10
    grid = tuple(m.patch_embed.dynamic_feat_size((96, 128)))
    assert grid == (6, 8) and d.token_map(name).shape[1:3] == grid
    torch.testing.assert_close(d.tokens[name].sum(1), d[name], rtol=0, atol=1e-12)
    with pytest.raises(vd.errors.InputError, match="multiple"):
        vd.decompose(m, torch.randn(1, 3, 100, 128, dtype=torch.float64))


@pytest.mark.parametrize("key", ["deit_b", "dinov2_b", "swin_b", "maxvit_s"])
def test_reference_layouts_give_the_published_component_sets(key):
    """Built on the meta device: the architecture only, no weights, no memory."""
    import timm
    from collections import Counter

    from vitdecomp.models import check_name, reference_layout

    lay = reference_layout(key)
    check_name(lay.model, lay.pretrained)                    # the weights tag exists in timm's registry
    with torch.device("meta"):
        m = timm.create_model(lay.model.split(":", 1)[1], pretrained=False)
    comps = vd.components_for(m, **lay.kwargs())
    assert dict(Counter(c.kind for c in comps)) == lay.counts


@pytest.mark.parametrize("name", ["timm:eva02_tiny_patch14_224", "timm:maxvit_tiny_tf_224"])
def test_family_stand_ins_load_with_their_own_preprocessing(name):
    """``load_model(name, **FAMILY_TEST_MODELS[name])``: the transform produces the size the model was
    built for, and the decomposition of a transformed image is exact."""
    import numpy as np
    from PIL import Image

    from vitdecomp.models import FAMILY_TEST_MODELS

    torch.manual_seed(0)
    lm = vd.load_model(name, dtype=torch.float64, **FAMILY_TEST_MODELS[name])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 240, 3), dtype=np.uint8))
    x = lm.transform(img)[None].double()
    size = FAMILY_TEST_MODELS[name]["img_size"]
    assert tuple(x.shape[-2:]) == tuple(lm.image_size) == (size, size)
    d = vd.decompose(lm, x)
    assert float(d.residual().max()) <= 1e-10
