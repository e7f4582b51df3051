"""The toy world: deterministic generator with correct planted attributes, tiny models, the demo wiring."""
from __future__ import annotations

import colorsys
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from vitdecomp.toyworld.generate import HUE_RANGES, SCENES, WorldConfig, _mask, caption, generate, render, sample_attributes
from vitdecomp.toyworld.registry import TOY_CLIP, TOY_VIT


def test_generator_is_deterministic_in_the_seed(tmp_path):
    cfg = WorldConfig(seed=3, n_train=20, n_val=5, n_test=5)
    a, b = sample_attributes(cfg), sample_attributes(cfg)
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a[:6], b[:6]))
    c = sample_attributes(WorldConfig(seed=4, n_train=20, n_val=5, n_test=5))
    assert [x["caption"] for x in a] != [x["caption"] for x in c]
    m1 = generate(str(tmp_path / "w1"), cfg)
    m2 = generate(str(tmp_path / "w2"), cfg)
    import pyarrow.parquet as pq

    t1, t2 = pq.read_table(m1).drop_columns(["uri"]), pq.read_table(m2).drop_columns(["uri"])
    assert t1.equals(t2)
    for rel in ("images/train/00000.png", "images/test/00004.png"):
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes()


def test_planted_attributes_are_what_the_pixels_show():
    cfg = WorldConfig(seed=0, n_train=4000, n_val=1000, n_test=10)
    attrs = sample_attributes(cfg)
    train = [a for a in attrs if a["split"] == "train"]
    val = [a for a in attrs if a["split"] == "val"]
    agree = lambda rows: np.mean([(a["label"] == 0) == (a["background"] == "water") for a in rows])  # noqa: E731
    assert abs(agree(train) - cfg.agreement) < 0.02          # spurious correlation in training
    assert abs(agree(val) - 0.5) < 0.05                      # none in validation
    for a in attrs[:200]:
        lo, hi = HUE_RANGES[a["label"]]
        h = a["hue"] - 1.0 if a["hue"] > hi else a["hue"]          # hues wrap around the wheel
        assert lo <= h <= hi, a
        assert a["scene"] in SCENES[a["background"]]
        assert caption(a) == a["caption"] and a["shape"] in a["caption"] and a["scene"] in a["caption"]
        img = render(a)
        m = _mask(a, img.shape[0])
        assert 0.02 < m.mean() < 0.5                          # the object is there, and not everything
        if a["texture"] == "plain":                           # object pixels carry the planted colour
            rgb = img[m].mean(0) / 255.0
            hue = colorsys.rgb_to_hsv(*rgb)[0]
            d = min(abs(hue - a["hue"]), 1 - abs(hue - a["hue"]))
            assert d < 0.02, (a["caption"], hue, a["hue"])


def test_toy_architectures_load_by_name_and_decompose_exactly(tmp_path):
    for name, n_comp in ((TOY_VIT, 22), (TOY_CLIP, 22)):
        lm = vd.load_model(name)
        x = torch.randn(3, 3, 64, 64)
        d = vd.decompose(lm, x)
        assert len(d.names) == n_comp and float(d.residual().max()) <= 1e-5
    with pytest.raises(ValueError, match="checkpoint"):
        vd.load_model(TOY_VIT, pretrained=True)


def average_precision_by_hand(score: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the foreground pixels of the precision among the pixels scoring at least as high."""
    s, pos = score.ravel(), np.sort(score.ravel()[mask.ravel()])
    everyone = np.sort(s)
    at_least = len(s) - np.searchsorted(everyone, pos, side="left")         # pixels with score ≥ this one's
    pos_at_least = len(pos) - np.searchsorted(pos, pos, side="left")        # foreground pixels with score ≥
    return float(np.mean(pos_at_least / at_least))


def test_average_precision_by_hand():
    from vitdecomp.query.heatmaps import average_precision

    rng = np.random.default_rng(0)
    score = np.round(rng.random((9, 9)), 1)                                 # ties included
    mask = rng.random((9, 9)) < 0.3
    assert average_precision_by_hand(score, mask) == pytest.approx(average_precision(score, mask), abs=1e-12)
    assert average_precision_by_hand(np.array([0.9, 0.8, 0.7]), np.array([True, False, True])) == \
        pytest.approx((1 / 1 + 2 / 3) / 2)


@pytest.mark.slow
def test_small_demo_produces_every_artefact_and_reruns_from_cache(ray_local, tmp_path):
    from vitdecomp.toyworld.demo import run

    lines = []
    s = run(str(tmp_path), small=True, progress=lines.append)
    assert [t.split(" ", 1)[0] for t in s["stages"]] == [f"{i}/7" for i in range(1, 8)]
    assert s["stages"][4].startswith("5/7 fit") and s["stages"][5].startswith("6/7 query")
    out = "\n".join(lines)
    for stage in s["stages"]:
        assert f"[demo] {stage} ..." in out and f"[demo] {stage}: done in" in out
    assert os.path.exists(s["metadata"])
    for k in ("classifier", "clip"):
        assert os.path.exists(s["models"][k]["checkpoint"]) and s["models"][k]["shipped"]   # no training
    n = 240 + 60 + 60
    clf = vd.open_store(s["stores"]["classifier"])
    clip = vd.open_store(s["stores"]["clip"])
    assert clf.count() == clip.count() == n
    assert clf.has_teacher and clf.manifest["teacher"]["name"] == TOY_CLIP
    assert clf.manifest["model"]["checkpoint_sha256"] and len(clf.names) == len(clip.names) == 22
    row = clf.read(columns=["image_id", "split", "label", "group", "caption"], ids=["test/00000"]).to_pylist()[0]
    assert row["split"] == "test" and row["group"].startswith(("warm", "cool"))
    # the stored classifier readout is the model's own pre-logits: its head gives the logits
    b = next(clf.iter_batches(batch_size=8, teacher=True))
    np.testing.assert_allclose(b.contributions.sum(1), b.readout, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(b.teacher, axis=1), 1.0, atol=1e-5)
    fits = s["fits"]
    assert os.path.exists(fits["aligner"] + ".safetensors") and os.path.exists(fits["aligner"] + ".json")
    for k, st in (("textspan_clip", clip), ("textspan_classifier", clf)):
        t = pq.read_table(os.path.join(fits[k], "textspan.parquet"))
        assert t.num_rows == 16 * 5 and set(t.column("component").to_pylist()) <= set(st.names)
    for k in ("compattribute_clip", "compattribute_classifier"):
        t = pq.read_table(os.path.join(fits[k], "compattribute.parquet"))
        assert "world background" in set(t.column("property").to_pylist())
        assert os.path.exists(os.path.join(fits[k], "compattribute.png"))
    q = {k: tmp_path / "query" / k for k in ("clip", "classifier")}
    for f in ("mitigation_compattribute.parquet", "mitigation_signed.parquet", "mitigation_signed.png",
              "ablation.parquet", "ablation.png", "heatmaps.parquet", "segmentation.parquet", "report.html"):
        assert (q["classifier"] / f).exists(), f
    for f in ("ablation.parquet", "retrieval.parquet", "retrieval.png", "heatmaps.parquet", "segmentation.parquet",
              "heatmap_grid.png", "report.html", "by-image/retrieval.parquet", "by-image/report.html"):
        assert (q["clip"] / f).exists(), f
    html = (q["classifier"] / "report.html").read_text()
    for section in ("CompAttribute", "mitigation_compattribute.png", "mitigation_signed.png", "ablation.png"):
        assert section in html
    # the mitigation tables agree with the summary, and the ablated components are the classifier's
    mt = pq.read_table(q["classifier"] / "mitigation_signed.parquet").to_pylist()
    worst = {r["setting"]: r["accuracy"] for r in mt if r["group"] == "worst group"}
    assert worst["before"] == pytest.approx(s["queries"]["mitigation_signed"]["worst_group"]["before"])
    assert set(s["queries"]["mitigation_signed"]["ablated"]) <= set(clf.names) and \
        len(s["queries"]["mitigation_signed"]["ablated"]) == 5
    seg = pq.read_table(q["clip"] / "segmentation.parquet").to_pylist()
    per_image = [r for r in seg if r["kind"] == "image"]
    assert len(per_image) == 4
    # the metrics recomputed by hand from the stored heatmaps and the world's masks
    heat = {r["image_id"]: r for r in pq.read_table(q["clip"] / "heatmaps.parquet").to_pylist()}
    for r in per_image:
        h = heat[r["image_id"]]
        grid = torch.tensor(h["heatmap"], dtype=torch.float64).reshape(1, 1, h["grid_h"], h["grid_w"])
        up = torch.nn.functional.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[0, 0].numpy()
        with Image.open(os.path.join(s["world"], "masks", r["image_id"] + ".png")) as im:
            mask = np.asarray(im.convert("L")) > 127       # 64 px images = the 64 px model input: no resampling
        norm = (up - up.min()) / (up.max() - up.min())
        assert r["pixacc"] == pytest.approx(float(np.mean((norm > norm.mean()) == mask)), abs=1e-12)
        assert r["ap"] == pytest.approx(average_precision_by_hand(norm, mask), abs=1e-9)
    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    assert set(summary["reports"]) == {"clip", "classifier"}
    # one index page links every report the demo wrote (queries, the by-image retrieval, both TextSpans)
    index = (tmp_path / "index.html").read_text()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("report.html"))
    assert len(written) == 5 and all(f'href="{w}"' in index for w in written), (written, index)
    assert "open " + str(tmp_path / "index.html") in out
    # the demo ends with the explorer's command for each store, and its options parse
    from vitdecomp.cli import build_parser

    serve = [line.strip() for line in lines if line.strip().startswith("vitdecomp serve ")]
    assert len(serve) == 2 and all(os.path.isdir(s["stores"][k]) for k in ("clip", "classifier"))
    for cmd in serve:
        ns = build_parser().parse_args(cmd.split()[1:])
        assert os.path.exists(ns.checkpoint) and os.path.exists(os.path.join(ns.fit, "textspan.parquet"))
    for k in ("clip", "classifier"):
        assert (q[k] / "interpretability.parquet").exists() and f"interpretability_{k}" in summary["queries"]
    assert set(summary["clip_zero_shot"]) >= {"shape"}
    # the classifier's group accuracies on the test split, recomputed from the stored readouts through its head
    head = vd.load_model(TOY_VIT, checkpoint=s["models"]["classifier"]["checkpoint"]).model.get_classifier()
    W, bias = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    hits: dict = {}
    for b in clf.iter_batches(batch_size=128, columns=["split", "label", "group"], dtype=np.float64):
        pred = (b.readout @ W.T + bias).argmax(-1)
        for p, split, y, g in zip(pred, *(b.columns[c].to_pylist() for c in ("split", "label", "group"))):
            if split == "test":
                hits.setdefault(g, []).append(int(p) == int(y))
    groups = {g: float(np.mean(v)) for g, v in hits.items()}
    assert summary["classifier_groups"]["groups"] == pytest.approx(groups, abs=1e-12)
    assert summary["classifier_groups"]["worst_group"] == pytest.approx(min(groups.values()), abs=1e-12)

    s2 = run(str(tmp_path), small=True)                       # cached: no retraining, nothing re-stored
    assert all(s2["models"][k]["cached"] for k in ("classifier", "clip"))
    assert vd.open_store(s2["stores"]["clip"]).count() == n
