"""Logs a user can trust: no "initialized randomly" when a checkpoint is loaded right after, and a
model built from a tag-named architecture without weights is recorded as random init."""
from __future__ import annotations

import logging

import pytest
from safetensors.torch import save_file

import vitdecomp as vd
from vitdecomp.toyworld.registry import TOY_CLIP

RANDOM = "initialized randomly"


def test_a_checkpoint_load_has_no_random_init_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    lm = vd.load_model(TOY_CLIP)
    assert any(RANDOM in r.getMessage() for r in caplog.records)     # open_clip does warn without weights
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()}, path)
    caplog.clear()
    again = vd.load_model(TOY_CLIP, checkpoint=path)
    assert not any(RANDOM in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert again.checkpoint == path
    # the filter is gone afterwards, and other warnings were never filtered
    logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert any(RANDOM in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("pretrained", [False, None])
def test_a_tag_in_the_name_without_weights_is_recorded_as_random_init(pretrained):
    lm = vd.load_model("timm:deit_tiny_patch16_224.fb_in1k", pretrained=pretrained)
    assert lm.pretrained is None
