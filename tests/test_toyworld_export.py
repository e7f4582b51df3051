"""The toy world exported in the real datasets' layouts (vitdecomp.toyworld.export), and the reproduce
experiments' layout validation: a missing dataset file fails before any work, naming the path it
expected and where the dataset comes from. No model runs here."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitdecomp.errors import InputError
from vitdecomp.toyworld.export import (MARKER, export_imagenet, export_segmentation, export_waterbirds, read_marker,
                                       wnid)
from vitdecomp.toyworld.generate import WorldConfig, object_mask, render, sample_attributes

ROOT = Path(__file__).resolve().parents[1]
CFG = WorldConfig(seed=3, n_train=24, n_val=12, n_test=12)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    return {"wb": export_waterbirds(str(base / "wb"), CFG), "in": export_imagenet(str(base / "in"), CFG),
            "flat": export_imagenet(str(base / "flat"), CFG, layout="flat"),
            "seg": export_segmentation(str(base / "seg"), CFG), "attrs": sample_attributes(CFG)}


def _jpeg_close(path: str, want: np.ndarray) -> float:
    got = np.asarray(Image.open(path).convert("RGB"), np.float64)
    return float(np.abs(got - want).mean())


# --------------------------------------------------------------------------------- waterbirds
def test_waterbirds_export_is_the_release_layout_with_the_planted_attributes(exported):
    root, attrs = exported["wb"], exported["attrs"]
    with open(os.path.join(root, "metadata.csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:5] == ["img_id", "img_filename", "y", "split", "place"]
        rows = list(reader)
    assert len(rows) == len(attrs) == 48
    for r, a in zip(rows, attrs):
        assert int(r["y"]) == a["label"]
        assert int(r["split"]) == {"train": 0, "val": 1, "test": 2}[a["split"]]
        assert int(r["place"]) == (1 if a["background"] == "water" else 0)          # the release: 1 = water
        folder, name = r["img_filename"].split("/")
        assert folder.split(".")[0] == f"{a['label'] + 1:03d}" and name.endswith(".jpg")
        # JPEG (as the release): close to the world's own pixels, not equal
        assert _jpeg_close(os.path.join(root, r["img_filename"]), render(a, CFG.size).astype(np.float64)) < 4.0
    # the planted spurious cue: warm (y=0) goes with water in the training split only
    train = [r for r in rows if r["split"] == "0"]
    agree = np.mean([(r["y"] == "0") == (r["place"] == "1") for r in train])
    assert agree > 0.8
    m = read_marker(root)
    assert m["kind"] == "waterbirds" and m["world_key"] == CFG.key()
    assert m["reproduce"]["spurious"] in m["properties"] and m["reproduce"]["core"] in m["properties"]


def test_waterbirds_validation_reads_the_release(exported):
    from vitdecomp.reproduce.waterbirds import validate

    lay = validate(exported["wb"])
    assert len(lay["rows"]) == 48
    assert {r["split"] for r in lay["rows"]} == {"train", "val", "test"}
    assert all(os.path.isfile(r["uri"]) for r in lay["rows"])
    # the folder above the release works too
    parent = os.path.dirname(exported["wb"])
    os.symlink(exported["wb"], os.path.join(parent, "waterbird_complete95_forest2water2"))
    assert validate(parent)["metadata"].endswith("waterbird_complete95_forest2water2/metadata.csv")


def test_waterbirds_validation_names_the_missing_file_and_the_source(tmp_path, exported):
    from vitdecomp.reproduce.common import DatasetError
    from vitdecomp.reproduce.waterbirds import validate

    with pytest.raises(DatasetError) as e:
        validate(str(tmp_path))
    assert str(tmp_path / "metadata.csv") in str(e.value) and "group_DRO" in str(e.value)
    assert isinstance(e.value, InputError)
    # a listed image that is missing: its path
    bad = tmp_path / "wb"
    bad.mkdir()
    text = Path(exported["wb"], "metadata.csv").read_text()
    (bad / "metadata.csv").write_text(text)
    first = text.splitlines()[1].split(",")[1]
    with pytest.raises(DatasetError, match="48 of the 48 images"):
        validate(str(bad))
    # a split code outside 0/1/2, a missing column
    (bad / "metadata.csv").write_text(text.replace(",0,", ",7,", 1))
    with pytest.raises(DatasetError, match="split must be 0/1/2"):
        validate(str(bad))
    (bad / "metadata.csv").write_text(text.replace("place,", "where,", 1))
    with pytest.raises(DatasetError, match=r"lacks the columns \['place'\]"):
        validate(str(bad))
    assert first.endswith(".jpg")


# ---------------------------------------------------------------------------------- imagenet
def test_imagenet_export_folders_and_flat_give_the_same_labels(exported):
    from vitdecomp.reproduce.imagenet_ablation import validate

    want = [a for a in exported["attrs"] if a["split"] in ("val", "test")]
    scenes = ("ocean", "lake", "forest", "desert")
    folders, flat = validate(exported["in"]), validate(exported["flat"])
    assert folders["layout"] == "folders" and flat["layout"] == "flat"
    assert folders["wnids"] == [wnid(i) for i in range(4)] and folders["class_names"] == list(scenes)
    by_stem = lambda lay: {os.path.splitext(os.path.basename(r["image_id"]))[0]: r for r in lay["rows"]}  # noqa: E731
    a, b = by_stem(folders), by_stem(flat)
    assert a.keys() == b.keys() and len(a) == len(want)
    for i, attr in enumerate(want, 1):
        stem = f"toyworld_val_{i:08d}"
        assert a[stem]["label"] == b[stem]["label"] == scenes.index(attr["scene"])
        assert a[stem]["uri"].endswith(f"val/{wnid(scenes.index(attr['scene']))}/{stem}.JPEG")
        assert _jpeg_close(b[stem]["uri"], render(attr, CFG.size).astype(np.float64)) < 4.0
    # the solution file's box is the object's bounding box
    line = Path(exported["flat"], "LOC_val_solution.csv").read_text().splitlines()[1].split(",")
    ys, xs = np.nonzero(object_mask(want[0], CFG.size))
    assert line[1].split()[1:] == [str(xs.min()), str(ys.min()), str(xs.max()), str(ys.max())]


def test_imagenet_validation_errors(tmp_path, exported):
    import shutil

    from vitdecomp.reproduce.common import DatasetError
    from vitdecomp.reproduce.imagenet_ablation import validate

    with pytest.raises(DatasetError) as e:
        validate(str(tmp_path))
    assert str(tmp_path / "val") in str(e.value) and "ILSVRC2012" in str(e.value)
    flat = tmp_path / "flat"
    shutil.copytree(exported["flat"], flat)
    os.remove(flat / "LOC_val_solution.csv")
    with pytest.raises(DatasetError, match="LOC_val_solution.csv: not found"):
        validate(str(flat))
    folders = tmp_path / "folders"
    shutil.copytree(exported["in"], folders)
    os.remove(folders / "LOC_synset_mapping.txt")
    with pytest.raises(DatasetError, match="LOC_synset_mapping.txt: not found: 4 classes"):
        validate(str(folders))
    os.rename(folders / "val" / wnid(0), folders / "val" / "ocean")
    with pytest.raises(DatasetError, match="not a WordNet id folder"):
        validate(str(folders))


# ------------------------------------------------------------------------------ segmentation
def test_segmentation_export_images_and_masks_are_the_planted_pixels(exported):
    from vitdecomp.reproduce.segmentation import validate

    root = exported["seg"]
    test = [a for a in exported["attrs"] if a["split"] == "test"]
    lay = validate(root)
    assert [r["image_id"] for r in lay["rows"]] == [a["image_id"].replace("/", "_") for a in test]
    for r, a in zip(lay["rows"], test):
        img = np.asarray(Image.open(r["uri"]).convert("RGB"))
        assert np.array_equal(img, render(a, CFG.size))                          # PNG: exact
        mask = np.asarray(Image.open(os.path.join(root, "masks", r["image_id"] + ".png")))
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 0, object_mask(a, CFG.size))
    assert read_marker(root)["foreground_fraction"] == pytest.approx(
        np.mean([object_mask(a, CFG.size).mean() for a in test]))
    assert os.path.isfile(os.path.join(root, MARKER))


def test_segmentation_validation_errors(tmp_path, exported):
    import shutil

    from vitdecomp.reproduce.common import DatasetError
    from vitdecomp.reproduce.segmentation import validate

    seg = tmp_path / "seg"
    shutil.copytree(exported["seg"], seg)
    shutil.rmtree(seg / "masks")
    with pytest.raises(DatasetError) as e:
        validate(str(seg))
    assert str(seg / "masks") in str(e.value) and "gtsegs_ijcv.mat" in str(e.value)
    shutil.copytree(Path(exported["seg"]) / "masks", seg / "masks")
    os.remove(seg / "masks" / "test_00003.png")
    with pytest.raises(DatasetError, match=r"test_00003.png: not found \(the mask of images/test_00003.png\)"):
        validate(str(seg))
    Image.new("L", (10, 10)).save(seg / "masks" / "test_00003.png")
    with pytest.raises(DatasetError, match="a mask must have its image's size"):
        validate(str(seg))


# -------------------------------------------------------------------- before any work
@pytest.mark.parametrize("experiment", ["waterbirds", "imagenet_ablation", "segmentation"])
def test_a_missing_dataset_fails_before_any_work(experiment, tmp_path, monkeypatch):
    """No decompose, no output folder: the layout is checked first."""
    import importlib

    from vitdecomp.reproduce import common
    from vitdecomp.reproduce.common import DatasetError

    mod = importlib.import_module(f"vitdecomp.reproduce.{experiment}")
    cls = {"waterbirds": "WaterbirdsConfig", "imagenet_ablation": "ImagenetAblationConfig",
           "segmentation": "SegmentationConfig"}[experiment]
    cfg = getattr(importlib.import_module("vitdecomp.reproduce.config"), cls)(
        root=str(tmp_path / "data"), out=str(tmp_path / "out"), model="deit_b", pretrained=True)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(common, "decompose", lambda *a, **k: pytest.fail("decompose ran"))
    with pytest.raises(DatasetError) as e:
        mod.run(cfg)
    expected = {"waterbirds": "metadata.csv", "imagenet_ablation": "val", "segmentation": "images"}[experiment]
    assert str(tmp_path / "data" / expected) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_models_need_weights_and_known_names(tmp_path):
    from vitdecomp.config import OptionError
    from vitdecomp.reproduce.common import resolve_models
    from vitdecomp.reproduce.config import WaterbirdsConfig

    cfg = WaterbirdsConfig(root="r", out="o", models=["deit_b,clip_b16"], pretrained=True)
    specs = resolve_models(cfg, ())
    assert [(s.key, s.name, s.pretrained) for s in specs] == [
        ("deit_b", "timm:deit_base_patch16_224", "fb_in1k"), ("clip_b16", "open_clip:ViT-B-16", "laion2b_s34b_b88k")]
    assert specs[0].blocks == range(7, 12)
    spec = resolve_models(WaterbirdsConfig(root="r", out="o", model="timm:deit_tiny_patch16_224.fb_in1k",
                                           pretrained=True), ())[0]
    assert (spec.name, spec.pretrained, spec.blocks) == ("timm:deit_tiny_patch16_224", "fb_in1k", None)
    with pytest.raises(OptionError, match="need trained weights"):
        resolve_models(WaterbirdsConfig(root="r", out="o", model="deit_b"), ())
    with pytest.raises(OptionError, match="unknown model 'deit_bb'"):
        resolve_models(WaterbirdsConfig(root="r", out="o", model="deit_bb", pretrained=True), ())
    with pytest.raises(OptionError, match="belongs to one model"):
        resolve_models(WaterbirdsConfig(root="r", out="o", models=["deit_b", "dino_b"], checkpoint="x"), ())


def test_blocks_option_of_a_block_path(tmp_path):
    from vitdecomp.reproduce.common import ModelSpec, blocks_option

    assert blocks_option(ModelSpec("k", "timm:deit_tiny_patch16_224", None, None, range(7, 12))) == "7-11"
    # a hierarchical model's published first block, by module path → its index among the model's blocks
    spec = ModelSpec("k", "timm:swin_tiny_patch4_window7_224", None, None, "layers.2.blocks.4")
    assert blocks_option(spec) == "8-11"          # 2 + 2 + 4 blocks before it; 12 blocks in all


def test_the_cli_prints_one_line_naming_the_missing_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "reproduce", "segmentation", "--root", str(tmp_path),
                        "--out", str(tmp_path / "out"), "--model", "deit_b", "--pretrained"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith(
        f"vitdecomp reproduce segmentation: error: {tmp_path / 'images'}: not found"), r.stderr


def test_format_table_puts_published_next_to_measured():
    from vitdecomp.reproduce.common import format_table, row

    rows = [row("waterbirds", "deit_b", "worst-group accuracy, before", 0.733, 0.7012),
            row("waterbirds", "toy", "worst-group accuracy, before", None, 0.5, {"expected": {"w": "below 0.9"}}, "w")]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["experiment", "model", "metric", "published", "measured"]
    assert lines[2].split()[-2:] == ["0.7330", "0.7012"]
    assert lines[3].endswith("toy world: below 0.9  0.5000")


class _Stop(Exception):
    pass


def _capture_decompose(monkeypatch) -> list:
    """Replace the decompose job by a recorder that stops the run at its first call."""
    import vitdecomp.pipeline

    seen = []

    def fake(cfg):
        seen.append(cfg)
        raise _Stop()
    monkeypatch.setattr(vitdecomp.pipeline, "run_decompose", fake)
    return seen


def test_pretrained_runs_decompose_the_published_models_and_teacher(exported, tmp_path, monkeypatch):
    """The --pretrained code path (no downloads here): the decompose job gets the published weights tags,
    component sets and CompAlign teacher."""
    from vitdecomp.reproduce import imagenet_ablation, waterbirds
    from vitdecomp.reproduce.config import ImagenetAblationConfig, WaterbirdsConfig

    seen = _capture_decompose(monkeypatch)
    with pytest.raises(_Stop):
        waterbirds.run(WaterbirdsConfig(root=exported["wb"], out=str(tmp_path / "wb"), model="deit_b", pretrained=True))
    d = seen[-1]
    assert (d.model, d.pretrained, d.checkpoint, d.blocks, d.heads) == (
        "timm:deit_base_patch16_224", "fb_in1k", None, "7-11", True)
    assert (d.teacher, d.teacher_pretrained) == ("open_clip:ViT-L-14", "laion2b_s32b_b82k")
    with pytest.raises(_Stop):
        waterbirds.run(WaterbirdsConfig(root=exported["wb"], out=str(tmp_path / "wb2"), model="clip_b16",
                                        pretrained=True))
    assert (seen[-1].model, seen[-1].pretrained, seen[-1].teacher) == ("open_clip:ViT-B-16", "laion2b_s34b_b88k", None)
    with pytest.raises(_Stop):
        imagenet_ablation.run(ImagenetAblationConfig(root=exported["in"], out=str(tmp_path / "in"), model="clip_b16",
                                                     pretrained=True))
    d = seen[-1]
    assert (d.model, d.pretrained, d.blocks, d.heads) == ("open_clip:ViT-B-16", "laion2b_s34b_b88k", None, False)
    import pyarrow.parquet as pq

    t = pq.read_table(d.input)
    assert sorted(t.column_names) == ["image_id", "label", "uri", "wnid"] and t.num_rows == 24


def test_a_non_clip_model_without_teacher_or_aligner_is_refused_before_work(exported, tmp_path, monkeypatch):
    from vitdecomp.config import OptionError
    from vitdecomp.reproduce import waterbirds
    from vitdecomp.reproduce.config import WaterbirdsConfig

    seen = _capture_decompose(monkeypatch)
    ck = tmp_path / "w.safetensors"
    ck.write_bytes(b"")
    with pytest.raises(OptionError, match="CompAttribute needs its components in a CLIP space"):
        waterbirds.run(WaterbirdsConfig(root=exported["wb"], out=str(tmp_path / "o"), model="deit_b",
                                        checkpoint=str(ck)))
    assert not seen


def test_the_1000_ilsvrc_classes_take_open_clips_names(tmp_path):
    """Real ImageNet: open_clip's curated class names in sorted-wnid order (no synsets file needed)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from vitdecomp.reproduce.imagenet_ablation import validate

    wnids = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]
    img = Image.new("RGB", (4, 4))
    for w in reversed(wnids):
        (tmp_path / "val" / w).mkdir(parents=True)
        img.save(tmp_path / "val" / w / f"ILSVRC2012_val_{w}.JPEG")
    lay = validate(str(tmp_path))
    assert lay["class_names"] == list(IMAGENET_CLASSNAMES) and lay["class_names"][0] == "tench"
    assert lay["rows"][0]["label"] == 0 and lay["rows"][-1]["label"] == 999


@pytest.mark.parametrize("experiment", ["waterbirds", "imagenet-ablation", "segmentation"])
def test_reproduce_help_imports_nothing_heavy(experiment):
    code = ("import sys, contextlib, io, vitdecomp.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try: vitdecomp.cli.main(['reproduce', {experiment!r}, '--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'ray', 'timm', 'open_clip', 'lance', 'numpy', 'pyarrow')\n"
            "         if m in sys.modules]\n"
            "print(heavy, 'usage: vitdecomp reproduce' in out.getvalue(), 'example:' in out.getvalue())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "[] True True", r.stdout + r.stderr


def test_imagenet_segmentation_mat_is_read_as_its_public_readers_index_it(tmp_path):
    """gtsegs_ijcv.mat (HDF5): the export is indexed here exactly as the benchmark's public loaders do
    (f[f['/value/img'][i, 0]] transposed (2, 1, 0); f[f[f['/value/gt'][i, 0]][0, 0]] transposed (1, 0)),
    and reproduce's conversion gives the world's pixels and masks."""
    import h5py

    from vitdecomp.reproduce.segmentation import convert_mat, validate
    from vitdecomp.toyworld.export import SEG_MAT, export_imagenet_segmentation

    root = export_imagenet_segmentation(str(tmp_path / "mat"), CFG, limit=5)
    test = [a for a in sample_attributes(CFG) if a["split"] == "test"][:5]
    with h5py.File(os.path.join(root, SEG_MAT), "r") as f:
        assert f["/value/img"].shape == f["/value/gt"].shape == (5, 1)
        for i, a in enumerate(test):
            img = np.array(f[f["/value/img"][i, 0]]).transpose((2, 1, 0))
            target = np.array(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose((1, 0))
            assert np.array_equal(img, render(a, CFG.size))
            assert np.array_equal(target, object_mask(a, CFG.size).astype(np.uint8))
    lay = validate(root)
    assert lay["mat"].endswith(SEG_MAT) and lay["count"] == 5
    conv = validate(convert_mat(lay["mat"], str(tmp_path / "conv"), limit=3))
    assert [r["image_id"] for r in conv["rows"]] == ["0", "1", "2"]
    for r, a in zip(conv["rows"], test):
        assert np.array_equal(np.asarray(Image.open(r["uri"])), render(a, CFG.size))
        mask = np.asarray(Image.open(os.path.join(conv["masks"], r["image_id"] + ".png")))
        assert np.array_equal(mask > 0, object_mask(a, CFG.size)) and set(np.unique(mask)) <= {0, 255}


def test_a_mat_file_without_masks_is_refused(tmp_path):
    import h5py

    from vitdecomp.reproduce.common import DatasetError
    from vitdecomp.reproduce.segmentation import validate

    with h5py.File(tmp_path / "gtsegs_ijcv.mat", "w") as f:
        f.create_dataset("value/img", (2, 1), dtype=h5py.special_dtype(ref=h5py.Reference))
    with pytest.raises(DatasetError, match=r"gtsegs_ijcv.mat: lacks /value/img or /value/gt"):
        validate(str(tmp_path))
    (tmp_path / "gtsegs_ijcv.mat").write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match="is not an HDF5"):
        validate(str(tmp_path))
