"""The toy world's two tiny models ship with the package (the demo trains nothing): their files match
the recorded SHA-256, they are used exactly for the world distribution and training config they were
trained with, they reach the recorded accuracies, and a retraining reproduces the recorded figures of the
reduced schedule within the stated tolerance."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import pytest

from vitdecomp.toyworld.generate import WorldConfig, generate
from vitdecomp.toyworld.train import (RETRAIN_TOLERANCE, SHIPPED_DIR, TrainConfig, ensure_models, group_accuracy,
                                      reduced_schedule_figures, shipped_index, shipped_models, zero_shot_accuracy)

INDEX = shipped_index()
needs_weights = pytest.mark.skipif(INDEX is None, reason="no shipped weights in vitdecomp/toyworld/weights")


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(str(root), WorldConfig())
    return str(root)


@needs_weights
def test_the_index_records_config_files_and_figures():
    assert INDEX["train_config"] == asdict(TrainConfig()) and INDEX["dtype"] == "fp16"
    for file in ("classifier", "clip"):
        entry = INDEX["models"][file]
        assert os.path.exists(os.path.join(SHIPPED_DIR, entry["file"]))
        assert len(entry["sha256"]) == 64
    assert 0.5 < INDEX["models"]["classifier"]["accuracy"] <= 1.0
    assert set(INDEX["models"]["clip"]["zero_shot"]) >= {"shape", "background"}
    assert INDEX["reduced_schedule_check"]["train_config"]["classifier_epochs"] < TrainConfig().classifier_epochs


@needs_weights
def test_shipped_models_are_used_exactly_for_their_world_and_training(tmp_path):
    got = shipped_models(WorldConfig(), TrainConfig())
    assert got and all(v["shipped"] and v["checkpoint"].startswith(SHIPPED_DIR) for v in got.values())
    assert shipped_models(WorldConfig(n_train=240, n_val=60, n_test=60), TrainConfig()) is not None   # same world
    assert shipped_models(WorldConfig(agreement=0.5), TrainConfig()) is None       # another distribution
    assert shipped_models(WorldConfig(seed=1), TrainConfig(seed=1)) is None
    assert shipped_models(WorldConfig(), TrainConfig(clip_epochs=2)) is None
    # ensure_models prefers them, and --retrain does not
    assert ensure_models("unused", "k", str(tmp_path), world_cfg=WorldConfig())["clip"]["shipped"]


@needs_weights
def test_a_shipped_file_that_does_not_match_its_checksum_is_refused(tmp_path):
    copy = tmp_path / "weights"
    shutil.copytree(SHIPPED_DIR, copy)
    path = copy / INDEX["models"]["classifier"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"do not match their recorded SHA-256.*--retrain"):
        shipped_models(WorldConfig(), TrainConfig(), directory=str(copy))


@needs_weights
def test_the_shipped_models_reach_the_recorded_accuracies(default_world):
    import vitdecomp as vd

    m = shipped_models(WorldConfig(), TrainConfig())
    clf = vd.load_model(m["classifier"]["model"], checkpoint=m["classifier"]["checkpoint"])
    clip = vd.load_model(m["clip"]["model"], checkpoint=m["clip"]["checkpoint"])
    g = group_accuracy(clf, default_world)
    rec = INDEX["models"]
    assert g["accuracy"] == pytest.approx(rec["classifier"]["accuracy"], abs=0.005)
    assert g["worst_group"] == pytest.approx(rec["classifier"]["worst_group"], abs=0.01)
    zs = zero_shot_accuracy(clip, default_world)
    for attr, v in rec["clip"]["zero_shot"].items():
        assert zs[attr] == pytest.approx(v, abs=0.005), attr


@needs_weights
@pytest.mark.slow
def test_retraining_with_the_reduced_schedule_reproduces_the_recorded_figures(default_world, tmp_path):
    rec = INDEX["reduced_schedule_check"]
    got = reduced_schedule_figures(default_world, 0, str(tmp_path), limit=rec["test_limit"])
    assert got["train_config"] == rec["train_config"]
    for key in ("accuracy", "worst_group"):
        assert abs(got["classifier"][key] - rec["classifier"][key]) <= RETRAIN_TOLERANCE, (key, got, rec)
    for attr, v in rec["clip"]["zero_shot"].items():
        assert abs(got["clip"]["zero_shot"][attr] - v) <= RETRAIN_TOLERANCE, (attr, got, rec)
