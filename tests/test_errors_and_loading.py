"""Bad input fails early with a message that says what, where and how to fix; model loading."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

import vitdecomp as vd
from conftest import images_for, model
from vitdecomp.errors import InputError, UnknownModelError, UnsupportedModuleError

DEIT = "timm:deit_tiny_patch16_224"


def fresh_deit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


# ---------------------------------------------------------------- images and options
def test_wrong_image_size_names_expected_size():
    lm = model(DEIT)
    with pytest.raises(InputError, match=r"\(112, 112\).*\(224, 224\).*transform"):
        vd.decompose(lm, torch.randn(1, 3, 112, 112))


def test_image_without_batch_dim_and_integer_images():
    lm = model(DEIT)
    with pytest.raises(InputError, match=r"images\[None\]"):
        vd.decompose(lm, torch.randn(3, 224, 224))
    with pytest.raises(InputError, match="float"):
        vd.decompose(lm, torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(InputError, match="transform"):
        vd.decompose(lm, [[0.0]])


def test_training_mode_is_refused():
    m = fresh_deit().train()
    with pytest.raises(InputError, match=r"eval\(\)"):
        vd.decompose(m, torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("blocks,msg", [([3, 5], "contiguous"), ([12], "out of range"), ([], "out of range"),
                                        ("abc", "block indices")])
def test_bad_block_selection(blocks, msg):
    lm = model(DEIT)
    with pytest.raises(InputError, match=msg):
        vd.decompose(lm, images_for(lm, 1), blocks=blocks)


def test_negative_blocks_select_the_tail():
    lm = model(DEIT)
    names = [c.name for c in vd.components_for(lm, blocks=[-2, -1], heads=False)]
    assert names == ["embed", "blocks.10.attn", "blocks.10.mlp", "blocks.11.attn", "blocks.11.mlp", "bias"]


def test_unknown_component_names_suggest_close_matches():
    lm = model(DEIT)
    x = images_for(lm, 1)
    with pytest.raises(InputError, match=r"blocks\.11\.attn\.head\.2"):
        vd.decompose(lm, x, tokens=["blocks.11.atn.head.2"])
    with pytest.raises(InputError, match="attention heads"):
        vd.decompose(lm, x, tokens=["blocks.11.mlp"])
    with pytest.raises(InputError, match="convention"):
        vd.decompose(lm, x, convention="centred")
    d = vd.decompose(lm, x)
    with pytest.raises(InputError, match="blocks.3.mlp"):
        d["blocks.3.mpl"]
    with pytest.raises(InputError, match="tokens="):
        d.token_map("blocks.3.attn.head.0")


# ---------------------------------------------------------------- unsupported modules
class MyAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, **kw):
        return self.lin(x)


def test_unknown_attention_module_is_named_with_its_path_and_type():
    m = fresh_deit()
    m.blocks[4].attn = MyAttention(192)
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.4\.attn.*MyAttention.*register_rule"):
        vd.decompose(m, torch.randn(1, 3, 224, 224))
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.4\.attn"):
        vd.components_for(m)


def test_attention_subclass_that_overrides_forward_is_refused_but_plain_subclass_is_accepted():
    from timm.models.vision_transformer import Attention

    class Tweaked(Attention):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask=attn_mask) * 2.0

    class Renamed(Attention):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)

    m = fresh_deit()
    old = m.blocks[1].attn
    m.blocks[1].attn = Renamed(192, num_heads=3, qkv_bias=True)
    m.blocks[1].attn.load_state_dict(old.state_dict())
    m.eval()
    x = torch.randn(1, 3, 224, 224)
    assert float(vd.decompose(m, x).residual().max()) <= 1e-5

    m.blocks[1].attn = Tweaked(192, num_heads=3, qkv_bias=True).eval()
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.1\.attn.*Tweaked"):
        vd.decompose(m, x)


def test_unknown_final_norm_and_pooling_are_refused():
    m = fresh_deit()
    m.norm = nn.BatchNorm1d(192).eval()
    with pytest.raises(UnsupportedModuleError, match=r"norm.*BatchNorm1d"):
        vd.decompose(m, torch.randn(1, 3, 224, 224))
    m = fresh_deit()
    m.global_pool = "max"
    with pytest.raises(UnsupportedModuleError, match="global_pool='max'"):
        vd.components_for(m)


def test_non_module_model_is_refused():
    msg = r"^expected a torch nn\.Module or a LoadedModel, got object \(<object object at 0x[0-9a-f]+>\); " \
          r"pass the model itself or vitdecomp\.load_model\('timm:<name>'\)$"
    for call in (lambda: vd.decompose(object(), torch.randn(1, 3, 224, 224)), lambda: vd.components_for(object())):
        with pytest.raises(InputError, match=msg) as info:
            call()
        assert type(info.value) is InputError


# ---------------------------------------------------------------- names, tags, checkpoints
@pytest.mark.parametrize("name,pretrained,pattern", [
    ("timm:deit_tiny_patch16_22", False, r"did you mean \[.*'deit_tiny_patch16_224'"),
    ("open_clip:ViT-S-61", False, r"did you mean \[.*'ViT-S-16'"),
    ("deit_tiny_patch16_224", False, r"timm:<model>"),
    ("torchvision:resnet50", False, r"timm:<model>"),
    ("timm:deit_tiny_patch16_224", "fb_in1kk", r"did you mean \['fb_in1k'\]"),
    ("open_clip:ViT-B-16", "laion2b_s34b_b8k", r"did you mean \[.*'laion2b_s34b_b88k'"),
    ("timm:deit_tiny_patch16_224.fb_in1k", "augreg_in21k", r"tag given twice"),
])
def test_unknown_names_and_tags_fail_at_once_with_suggestions(name, pretrained, pattern):
    with pytest.raises(UnknownModelError, match=pattern):
        vd.load_model(name, pretrained=pretrained)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(UnknownModelError, match="does not exist"):
        vd.load_model(DEIT, checkpoint=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    src = vd.load_model(DEIT)
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    lm = vd.load_model(DEIT, checkpoint=str(path))
    for (k, a), b in zip(src.model.state_dict().items(), lm.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert lm.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    x = images_for(lm, 1)
    assert float(vd.decompose(lm, x).residual().max()) <= 1e-5


def test_checkpoint_for_the_wrong_architecture_fails(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(RuntimeError, match="Missing key"):
        vd.load_model(DEIT, checkpoint=str(path))


def test_loaded_model_preprocessing_and_readout():
    from PIL import Image

    img = Image.new("RGB", (300, 200), (200, 30, 30))
    for name, kind, dim in [(DEIT, "pre_logits", 192), ("open_clip:ViT-S-16", "image_embedding", 384)]:
        lm = model(name)
        x = lm.transform(img)
        assert x.shape == (3, *lm.image_size) and x.dtype == torch.float32
        # red pixels normalised with the model's own mean/std: channel 0 positive, 1 and 2 negative
        assert float(x[0].mean()) > 0 > float(x[1].mean())
        assert (lm.readout.kind, lm.readout.dim) == (kind, dim)
        d = vd.decompose(lm, x[None])
        assert d.readout.shape == (1, dim)
