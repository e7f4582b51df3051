"""open_clip towers built on a timm trunk (open_clip ``TimmModel``: SigLIP, EVA-CLIP, ViTamin, ConvNeXt …):
exact decomposition of ``encode_image`` for supported trunks, a clear refusal before any forward pass
for the others, and ``load_model`` for them.

The architectures are real open_clip names built with config overrides (``load_model(name, vision_cfg=…,
text_cfg=…)``): the timm trunk is a registered timm entrypoint (``vitdecomp.zoo.register_tiny_timm``, as
the zoo sweep does) that builds the config's own ``timm_model_name`` with small widths/depths, the text tower a tiny transformer; open_clip's own
``TimmModel`` builds the tower (trunk, classifier, pool, head).
"""
from __future__ import annotations

import functools
import importlib.util
import sys

import pytest
import torch

import vitdecomp as vd
from vitdecomp.errors import UnsupportedModuleError
from vitdecomp.zoo import register_tiny_timm

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# small builds of the timm trunks used by open_clip configs
TRUNKS = {
    "vit_base_patch16_siglip_224": dict(embed_dim=64, depth=2, num_heads=4, img_size=64),
    "eva02_base_patch16_clip_224": dict(embed_dim=64, depth=2, num_heads=4, img_size=64),
    "vit_medium_patch16_gap_256": dict(embed_dim=64, depth=2, num_heads=4, img_size=64),
    "vit_base_patch16_clip_224": dict(embed_dim=64, depth=2, num_heads=4, img_size=64),
    "swin_base_patch4_window7_224": dict(embed_dim=32, depths=(1, 1, 2), num_heads=(2, 2, 2), img_size=112),
    "convnext_base": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
    "maxvit_tiny_tf_224": dict(embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16, head_hidden_size=64,
                               img_size=128, transformer_dim_head=16),
    "maxvit_rmlp_pico_rw_256": dict(img_size=128),
    "resnet18": dict(layers=(1, 1, 1, 1)),
}
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

# shrunk copies of real open_clip architectures: name → (real architecture, vision_cfg overrides)
ARCHS = {
    "ViT-B-16-SigLIP": ("ViT-B-16-SigLIP", {}),                                   # map pool, proj 'none'
    "EVA02-B-16": ("EVA02-B-16", {}),                                             # token pool, trunk head Linear
    "vit_medium_patch16_gap_256": ("vit_medium_patch16_gap_256", {}),             # per-token norm + mean, 'linear'
    "swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", {}),         # Swin, 'linear'
    "convnext_base": ("convnext_base", {}),                                       # no rule for the trunk
    "vit-token-linear-bias": ("ViT-B-16-SigLIP", dict(timm_model_name="vit_base_patch16_clip_224",
                                                       timm_pool="token", timm_proj="linear", timm_proj_bias=True)),
    "vit-token-mlp": ("ViT-B-16-SigLIP", dict(timm_model_name="vit_base_patch16_clip_224", timm_pool="token",
                                              timm_proj="mlp")),
    "maxvit-rw-linear": ("ViT-B-16-SigLIP", dict(timm_model_name="maxvit_rmlp_pico_rw_256", timm_pool="",
                                                 timm_proj="linear", timm_proj_bias=True)),
    "maxvit-tanh-head": ("ViT-B-16-SigLIP", dict(timm_model_name="maxvit_tiny_tf_224", timm_pool="",
                                                 timm_proj="linear")),
    "resnet-abs-attn": ("ViT-B-16-SigLIP", dict(timm_model_name="resnet18", timm_pool="abs_attn", timm_proj="")),
}
EXACT = ["ViT-B-16-SigLIP", "EVA02-B-16", "vit_medium_patch16_gap_256", "swin_base_patch4_window7_224",
         "vit-token-linear-bias", pytest.param("maxvit-rw-linear", marks=pytest.mark.slow)]


def _tiny_name(base: str) -> str:
    """The registered timm entrypoint that builds ``base`` small (the library's helper, shared with the zoo sweep)."""
    return register_tiny_timm(base, TRUNKS[base])


def _register() -> None:
    for base in TRUNKS:
        _tiny_name(base)


@pytest.fixture(scope="module")
def registered():
    _register()


def shrunk_cfg(name: str) -> tuple[str, dict]:
    """(real architecture, ``load_model`` overrides): the real config with a small trunk and text tower."""
    import open_clip

    real, over = ARCHS[name]
    vc = {**open_clip.get_model_config(real)["vision_cfg"], **over}
    base = vc["timm_model_name"]
    vc.update(timm_model_name=_tiny_name(base), image_size=TRUNKS[base].get("img_size", 224))
    return real, dict(embed_dim=64, vision_cfg=vc, text_cfg=dict(TEXT))


@functools.lru_cache(maxsize=None)
def clip(name: str, dtype=torch.float32) -> vd.LoadedModel:
    real, overrides = shrunk_cfg(name)
    lm = vd.load_model(f"open_clip:{real}", dtype=dtype, seed=0, **overrides)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                               # non-trivial norm affines, biases and latents
        for n, p in lm.model.visual.named_parameters():
            if "norm" in n or "bias" in n or "latent" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return lm


def images(lm, dtype, batch=2):
    return torch.randn(batch, 3, *lm.image_size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def encode_image(lm, x, normalize=False):
    """open_clip's own readout, called without vitdecomp."""
    with torch.inference_mode():
        return lm.model.encode_image(x, normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", EXACT)
def test_timm_tower_reconstruction(registered, name, dtype):
    lm = clip(name, dtype)
    x = images(lm, dtype)
    z = encode_image(lm, x)
    assert lm.readout.dim == z.shape[-1] == 64
    heads = [c.name for c in vd.components_for(lm) if c.kind == "head"]
    assert heads and all(h.startswith("trunk.") for h in heads), "names keep the upstream path under the tower"
    scale = float(z.norm(dim=-1).max())
    for convention in ("centered", "uniform"):
        d = vd.decompose(lm, x, convention=convention, tokens=[heads[-1]])
        assert torch.equal(d.readout, z), "readout must be encode_image itself"
        err = float(d.residual().max())
        assert err <= TOL[dtype], f"{name} {convention}: relative error {err:.2e}"
        torch.testing.assert_close(d.tokens[heads[-1]].sum(1), d[heads[-1]], rtol=0, atol=TOL[dtype] * scale)
    dn = vd.decompose(lm, x, normalize=True)
    torch.testing.assert_close(dn.readout, encode_image(lm, x, normalize=True), rtol=0, atol=TOL[dtype])
    assert float(dn.residual().max()) <= TOL[dtype]


@pytest.mark.parametrize("name", EXACT)
def test_timm_tower_heads_sum_to_layer(registered, name):
    lm = clip(name, torch.float64)
    x = images(lm, torch.float64)
    scale = float(encode_image(lm, x).norm(dim=-1).max())
    on, off = (vd.decompose(lm, x, heads=h, convention="uniform") for h in (True, False))
    attn = [c for c in off.components if c.kind == "attn"]
    assert attn and sum(cc.kind == "head" for cc in on.components) > len(attn), "some attention has several heads"
    for c in attn:
        idx = [k for k, cc in enumerate(on.components) if cc.kind == "head" and cc.path == c.path]
        assert idx, c.name
        torch.testing.assert_close(on.contributions[:, idx].sum(1), off[c.name], rtol=0, atol=1e-12 * scale)


def test_tower_is_projection_of_trunk(registered):
    """Swin tower (timm_proj='linear', no bias): every component is ``head.proj`` applied to the plain
    timm trunk's component (decomposed on its own), and the bias gets nothing more."""
    lm = clip("swin_base_patch4_window7_224", torch.float64)
    x = images(lm, torch.float64)
    tower = vd.decompose(lm, x)
    trunk = vd.decompose(lm.model.visual.trunk, x)
    w = lm.model.visual.head.proj.weight
    assert lm.model.visual.head.proj.bias is None
    assert tower.names == ["trunk." + n if n not in ("embed", "bias") else n for n in trunk.names]
    torch.testing.assert_close(tower.contributions, trunk.contributions @ w.T, rtol=0, atol=1e-12)


def test_siglip_tower_names_and_pool_view(registered):
    lm = clip("ViT-B-16-SigLIP")
    names = [c.name for c in vd.components_for(lm)]
    assert names[-2:] == ["trunk.attn_pool.mlp", "bias"] and names[1] == "trunk.blocks.0.attn.head.0"
    x = images(lm, torch.float32)
    view = vd.decompose(lm, x).pool_view()
    assert view.names[0] == "trunk.attn_pool.head.0"
    assert float(view.residual().max()) <= 1e-5
    assert vd.engine.block_paths(lm) == ["trunk.blocks.0", "trunk.blocks.1"]
    d = vd.decompose(lm, x, blocks="trunk.blocks.1")
    assert d.names[1] == "trunk.blocks.1.attn.head.0" and float(d.residual().max()) <= 1e-5


def test_last_mlp_against_hand_formula(registered):
    """CLS-pooled ViT trunk + ``head.proj`` with bias: the last block's MLP contribution computed by hand —
    ``W_p · (γ ⊙ C(m) / σ)`` with ``m`` the MLP output at the class token and ``σ`` the final norm's
    statistic of the real last stream there (centered convention; β and the projection bias go to ``bias``)."""
    lm = clip("vit-token-linear-bias", torch.float64)
    v = lm.model.visual
    trunk, proj = v.trunk, v.head.proj
    x = images(lm, torch.float64)
    cap = {}
    hs = [trunk.blocks[-1].mlp.register_forward_hook(lambda _, __, out: cap.__setitem__("mlp", out)),
          trunk.norm.register_forward_pre_hook(lambda _, args: cap.__setitem__("final", args[0]))]
    try:
        encode_image(lm, x)
    finally:
        for h in hs:
            h.remove()
    m, xl = cap["mlp"][:, 0], cap["final"][:, 0]
    sigma = (xl.var(-1, unbiased=False, keepdim=True) + trunk.norm.eps).sqrt()
    c = trunk.norm.weight * (m - m.mean(-1, keepdim=True)) / sigma
    c = c * (trunk.blocks[-1].ls2.gamma if hasattr(trunk.blocks[-1].ls2, "gamma") else 1.0)
    want = c @ proj.weight.T
    d = vd.decompose(lm, x)
    torch.testing.assert_close(d["trunk.blocks.1.mlp"], want, rtol=0, atol=1e-12)
    bias_part = trunk.norm.bias @ proj.weight.T + proj.bias
    assert float((d["bias"] - bias_part).norm()) > 1e-3, "bias holds the heads' out-projection biases too"


@pytest.mark.parametrize("name, where, what", [
    ("convnext_base", "trunk", "ConvNeXt"),
    ("vit-token-mlp", "head.mlp", "Mlp"),
    ("maxvit-tanh-head", "trunk.head.pre_logits", "non-linear"),      # MaxViT is supported, its tanh head is not
    ("resnet-abs-attn", "head.pool", "AttentionPool2d"),
])
def test_unsupported_tower_refused_before_forward(registered, name, where, what):
    lm = clip(name)
    assert lm.readout.dim == 64
    ran = []
    h = lm.model.visual.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        for call in (lambda: vd.components_for(lm), lambda: vd.decompose(lm, images(lm, torch.float32))):
            with pytest.raises(UnsupportedModuleError) as e:
                call()
            msg = str(e.value)
            assert msg.startswith(where) and what in msg, msg
    finally:
        h.remove()
    assert not ran, "refused before any forward pass"


def test_trunk_errors_name_paths_under_trunk(registered):
    """A trunk whose own rule refuses a sub-module reports the path under the tower (``trunk.…``)."""
    from vitdecomp.engine.rules.open_clip_timm import _prefix_message

    assert _prefix_message("<root>: no model rule for X") == "trunk: no model rule for X"
    assert _prefix_message("blocks.3.attn: gated") == "trunk.blocks.3.attn: gated"
    assert _prefix_message("timm ViT global_pool='x': only …") == "trunk: timm ViT global_pool='x': only …"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="SigLIP's tokenizer is available here")
def test_missing_tokenizer_is_a_clear_error_not_a_load_failure(registered):
    """open_clip picks SigLIP's tokenizer (it needs ``transformers``) by the architecture name: the model
    still loads and decomposes; tokenizing raises what is missing."""
    from vitdecomp.errors import InputError

    lm = clip("ViT-B-16-SigLIP")
    with pytest.raises(InputError, match="tokenizer of open_clip:ViT-B-16-SigLIP is not available.*transformers"):
        lm.tokenizer(["a photo"])


def test_module_registered_for_workers():
    assert "vitdecomp.engine.rules.open_clip_timm" in sys.modules
