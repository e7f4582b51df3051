"""``vitdecomp reproduce`` end to end on the toy world exported in the real datasets' layouts, with the
toy models shipped with the package. Each experiment's numbers are checked against the query job run
by hand on the same store and settings, against a computation that never touches the store (the
models run directly on the exported files), and against the world's planted truth. Ray-heavy: slow."""
from __future__ import annotations

import os

import numpy as np
import pytest

from vitdecomp.toyworld.generate import WorldConfig

pytestmark = pytest.mark.slow
WORLD = WorldConfig(n_train=240, n_val=60, n_test=60)
TOY_VIT, TOY_CLIP = "timm:vitdecomp_toy_vit", "open_clip:vitdecomp-toy-clip"


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    from vitdecomp.toyworld import export
    from vitdecomp.toyworld.train import TrainConfig, shipped_models

    models = shipped_models(WORLD, TrainConfig())
    assert models is not None, "the toy models shipped with vitdecomp do not fit this world"
    base = tmp_path_factory.mktemp("reproduce")
    return {"base": base, "cache": str(base / "text-cache"),
            "classifier": models["classifier"]["checkpoint"], "clip": models["clip"]["checkpoint"],
            "wb": export.export_waterbirds(str(base / "waterbirds"), WORLD),
            "in": export.export_imagenet(str(base / "imagenet"), WORLD, splits=("test",)),
            "seg": export.export_segmentation(str(base / "seg"), WORLD, limit=16),
            "mat": export.export_imagenet_segmentation(str(base / "mat"), WORLD, limit=16)}


def _measured(rows, metric_start: str) -> float:
    (r,) = [r for r in rows if r["metric"].startswith(metric_start)]
    assert r["reference"].startswith("toy world: ")           # no published number applies to the toy world
    return r["measured"]


def _images(lm, uris):
    import torch
    from PIL import Image

    return torch.stack([lm.transform(Image.open(u).convert("RGB")) for u in uris])


# ---------------------------------------------------------------------------------- waterbirds
def test_waterbirds_on_the_exported_world(world):
    import torch

    from vitdecomp.config import MitigateConfig
    from vitdecomp.models import load_model
    from vitdecomp.query.jobs import run_mitigate
    from vitdecomp.reproduce import waterbirds
    from vitdecomp.reproduce.config import WaterbirdsConfig

    out = str(world["base"] / "out-wb")
    common = dict(root=world["wb"], model=TOY_VIT, checkpoint=world["classifier"], teacher=TOY_CLIP,
                  teacher_checkpoint=world["clip"], head="model", align_epochs=3, align_lr=1e-3, k=5, dtype="fp32",
                  cache_dir=world["cache"], random_draws=2)
    res = waterbirds.run(WaterbirdsConfig(out=out, **common))
    rows = res["rows"]
    assert [r["metric"] for r in rows][:2] == ["worst-group accuracy, before",
                                               "worst-group accuracy, top 5 ablated (heldout)"]
    assert "published" in res["table"].splitlines()[0] and "toy world:" in res["table"]
    assert res["spurious"] == "world background" and res["core"] == "world color"       # from the export's marker
    store = res["stores"]["vitdecomp_toy_vit"]

    # the query job by hand, on the same store, with the published settings spelled out
    hand = run_mitigate(MitigateConfig(
        store=store, out=str(world["base"] / "hand-wb"), label_column="y", group_column="place",
        class_names=["warm", "cool"], head="model", checkpoint=world["classifier"],
        aligner=os.path.join(out, "fit", "vitdecomp_toy_vit-compalign"), properties=res["properties"],
        spurious="world background", core="world color", k=5, split_column="split", fit_split=["val"],
        eval_split=["test"], clip_checkpoint=world["clip"], cache_dir=world["cache"], random_draws=2))["summary"]
    assert _measured(rows, "worst-group accuracy, before") == hand["worst_group"]["before"]
    assert _measured(rows, "worst-group accuracy, top 5") == hand["worst_group"]["after"]
    assert _measured(rows, "mean-group accuracy, before") == hand["mean_group"]["before"]
    assert _measured(rows, "mean-group accuracy, top 5") == hand["mean_group"]["after"]

    # independent of the store: the classifier on the exported test images, grouped by (y, place)
    import csv

    with open(os.path.join(world["wb"], "metadata.csv"), newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "2"]
    lm = load_model(TOY_VIT, checkpoint=world["classifier"])
    with torch.inference_mode():
        pred = lm.model(_images(lm, [os.path.join(world["wb"], r["img_filename"]) for r in test])).argmax(-1).numpy()
    groups = {}
    for p, r in zip(pred, test):
        groups.setdefault((r["y"], r["place"]), []).append(p == int(r["y"]))
    acc = {g: float(np.mean(v)) for g, v in groups.items()}
    assert _measured(rows, "worst-group accuracy, before") == pytest.approx(min(acc.values()), abs=1e-12)
    assert _measured(rows, "mean-group accuracy, before") == pytest.approx(np.mean(list(acc.values())), abs=1e-12)
    # planted truth: the classifier leans on the background, so its worst group is a background-mismatch group
    worst = min(acc, key=acc.get)
    assert (worst[0] == "0") != (worst[1] == "1")             # warm on land or cool on water
    assert min(acc.values()) < np.mean(list(acc.values())) - 0.1

    # the published protocol: components, means and accuracy on the same (test) rows
    same = waterbirds.run(WaterbirdsConfig(out=out, protocol="same-pool", **common))
    hand_same = run_mitigate(MitigateConfig(
        store=store, out=str(world["base"] / "hand-wb-same"), label_column="y", group_column="place",
        class_names=["warm", "cool"], head="model", checkpoint=world["classifier"],
        aligner=os.path.join(out, "fit", "vitdecomp_toy_vit-compalign"), properties=res["properties"],
        spurious="world background", core="world color", k=5, split_column="split", protocol="same-pool",
        eval_split=["test"], clip_checkpoint=world["clip"], cache_dir=world["cache"], random_draws=2))["summary"]
    assert same["mitigation"]["vitdecomp_toy_vit"]["protocol"] == "same-pool"
    assert _measured(same["rows"], "worst-group accuracy, top 5") == hand_same["worst_group"]["after"]
    assert _measured(same["rows"], "worst-group accuracy, before") == _measured(rows, "worst-group accuracy, before")


# --------------------------------------------------------------------------- imagenet ablation
def test_imagenet_ablation_on_the_exported_world(world, capsys):
    import torch

    from vitdecomp.config import AblateConfig
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.models import load_model
    from vitdecomp.query.jobs import run_ablate
    from vitdecomp.reproduce import imagenet_ablation
    from vitdecomp.reproduce.config import ImagenetAblationConfig

    res = imagenet_ablation.run(ImagenetAblationConfig(root=world["in"], out=str(world["base"] / "out-in"),
                                                       model=TOY_CLIP, checkpoint=world["clip"], dtype="fp32",
                                                       cache_dir=world["cache"]))
    scenes = ["ocean", "lake", "forest", "desert"]
    assert res["class_names"] == scenes and res["layout"] == "folders"
    base, mlp = _measured(res["rows"], "zeroshot accuracy"), _measured(res["rows"], "accuracy, every MLP")
    hand = run_ablate(AblateConfig(store=res["stores"]["vitdecomp-toy-clip"], out=str(world["base"] / "hand-in"),
                                   label_column="label", class_names=scenes, head="zeroshot",
                                   clip_checkpoint=world["clip"], cache_dir=world["cache"]))["summary"]
    assert base == hand["baseline_accuracy"] and mlp == hand["all_ablated_accuracy"]["mlp"]

    # independent of the store: zero-shot on the exported files, classes from the folder names
    lm = load_model(TOY_CLIP, checkpoint=world["clip"])
    val = os.path.join(world["in"], "val")
    files = [(os.path.join(val, w, f), i) for i, w in enumerate(sorted(os.listdir(val)))
             for f in sorted(os.listdir(os.path.join(val, w)))]
    with torch.inference_mode():
        img = torch.nn.functional.normalize(lm.model.encode_image(_images(lm, [f for f, _ in files])), dim=-1).numpy()
    txt = encode_texts(lm, scenes, cache_dir=world["cache"])
    direct = float(np.mean((img @ txt.T).argmax(-1) == np.array([i for _, i in files])))
    assert base == pytest.approx(direct, abs=1e-12)
    assert base > 0.25 + 0.2                                   # planted truth: the tiny CLIP knows the scenes

    # the command line prints the same table (a rerun into the same --out reuses the store)
    from vitdecomp.cli import main

    capsys.readouterr()
    assert main(["reproduce", "imagenet-ablation", "--root", world["in"], "--out", str(world["base"] / "out-in"),
                 "--model", TOY_CLIP, "--checkpoint", world["clip"], "--dtype", "fp32", "--cache-dir", world["cache"],
                 "-q"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["experiment", "model", "metric", "published", "measured"]
    line = next(ln for ln in printed if "zeroshot accuracy" in ln)
    assert line.split()[-1] == f"{base:.4f}" and "toy world: above chance (0.25)" in line
    assert any("report.html" in ln for ln in printed)


# ---------------------------------------------------------------------------------- segmentation
def test_segmentation_on_the_exported_world(world):
    from vitdecomp.config import HeatmapConfig
    from vitdecomp.query.heatmap_job import run_heatmap
    from vitdecomp.reproduce import segmentation
    from vitdecomp.reproduce.config import SegmentationConfig

    res = segmentation.run(SegmentationConfig(root=world["seg"], out=str(world["base"] / "out-seg"), model=TOY_CLIP,
                                              checkpoint=world["clip"], dtype="fp32", cache_dir=world["cache"]))
    seg = res["segmentation"]["vitdecomp-toy-clip"]
    assert seg["components"] == [f"transformer.resblocks.{b}.attn" for b in range(4)]   # the last 4 blocks
    assert seg["target"] == "text 'a shape'"                                            # from the export's marker
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(world["seg"], "images")))
    hand = run_heatmap(HeatmapConfig(store=res["stores"]["vitdecomp-toy-clip"], out=str(world["base"] / "hand-seg"),
                                     components=seg["components"], image_ids=ids, text="a shape",
                                     masks_dir=os.path.join(world["seg"], "masks"), checkpoint=world["clip"],
                                     clip_checkpoint=world["clip"], cache_dir=world["cache"]))["summary"]
    assert _measured(res["rows"], "pixAcc") == hand["pooled_pixacc"]
    assert _measured(res["rows"], "mIoU") == hand["pooled_miou"]
    assert _measured(res["rows"], "mAP") == hand["mean_map"]
    # planted truth: the maps point at the object more than a map unrelated to it would (mAP 0.5)
    assert _measured(res["rows"], "mAP") > 0.6

    # the same images as the benchmark's single file (gtsegs_ijcv.mat): the same numbers
    mat = segmentation.run(SegmentationConfig(root=world["mat"], out=str(world["base"] / "out-mat"), model=TOY_CLIP,
                                              checkpoint=world["clip"], dtype="fp32", cache_dir=world["cache"]))
    for metric in ("pixAcc", "mIoU", "mAP"):
        assert _measured(mat["rows"], metric) == pytest.approx(_measured(res["rows"], metric), abs=1e-12)
