"""Mean-ablation curves, the linear probe and spurious-feature mitigation on stores with planted truth."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import vitdecomp as vd
from jobutil import synthetic_components, write_store
from vitdecomp.fit.probe import LinearHead, fit_probe, label_indices
from vitdecomp.query.ablation import ablation_masks
from vitdecomp.config import AblateConfig, MitigateConfig
from vitdecomp.query.jobs import run_ablate, run_mitigate
from vitdecomp.query.compattribute import basis
from vitdecomp.errors import InputError
from vitdecomp.fit.text import encode_texts
from vitdecomp.toyworld.registry import TOY_CLIP

D = 64                       # the toy CLIP's embedding size
PROPS = {"bg": ["water"], "obj": ["a warm object"]}     # one direction each: the planted truth is exact


@pytest.fixture(scope="module")
def directions():
    """Unit directions from the seed-0 random toy CLIP's text tower: u_s = the 'bg' property's
    direction, u_c = the 'obj' one orthogonalised against u_s (random text towers embed every text
    in nearly the same direction, so 'obj' itself still overlaps 'bg')."""
    torch.manual_seed(0)
    clip = vd.load_model(TOY_CLIP)
    Qs = basis(encode_texts(clip, PROPS["bg"]))
    Qc = basis(encode_texts(clip, PROPS["obj"]))
    u_s = Qs[0]
    u_c = Qc[0] - (Qc[0] @ u_s) * u_s
    return u_s, u_c / np.linalg.norm(u_c)


def planted(directions, n=800, seed=0, agreement=0.5):
    """Label y, background g; blocks.0.mlp carries the background (spurious), blocks.2.attn.head.1 the
    label (core); every other component small noise orthogonal to both. The head reads both."""
    u_s, u_c = directions
    rng = np.random.default_rng(seed)
    comps = synthetic_components()
    names = [c.name for c in comps]
    y = rng.integers(0, 2, n)
    g = np.where(rng.random(n) < agreement, y, 1 - y)          # background agrees with the label w.p. agreement
    c = 0.05 * rng.normal(size=(n, len(comps), D))      # small isotropic noise (Pearson is scale-free:
    #                                                       exactly-zero projections would make it random)
    c[:, names.index("blocks.0.mlp")] += np.outer(np.where(g == 1, 1.5, -1.5), u_s)
    c[:, names.index("blocks.2.attn.head.1")] += np.outer(4 * (np.where(y == 1, 1.0, -1.0) + 0.4 * rng.normal(size=n)),
                                                          u_c)
    c[:, names.index("bias")] = 0.3 * u_c                                     # input-independent
    split = np.where(np.arange(n) < n // 2, "val", "test")
    cols = {"label": [("warm", "cool")[v] for v in y], "background": [("water", "land")[v] for v in g],
            "split": list(split)}
    w = u_s + 0.25 * u_c
    W = np.stack([-w, w])                                # class 1 when ⟨z, w⟩ > 0: background ±1.5, label ±1
    head = LinearHead("probe", ["warm", "cool"], W, np.array([0.3, -0.3]), "native")
    return comps, c, cols, head


@pytest.fixture(scope="module")
def world(directions, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    comps, c, cols, head = planted(directions)
    store = write_store(root / "store", c.astype(np.float32), comps, dict(cols))
    head.save(str(root / "head"))
    return {"store": store, "head": str(root / "head"), "c": c.astype(np.float32).astype(np.float64),
            "cols": cols, "comps": comps, "W": head.W, "b": head.b, "props": _props(root)}


def _props(root):
    import yaml

    p = root / "props.yaml"
    p.write_text(yaml.safe_dump(PROPS))
    return str(p)


def _acc(z, y, W, b):
    return float(((z @ W.T + b).argmax(1) == y).mean())


def test_label_indices_by_name_then_index():
    assert label_indices(["cool", "warm", None, "x", 1, 5], ["warm", "cool"]).tolist() == [1, 0, -1, -1, 1, -1]


def test_ablation_curves_equal_a_direct_computation(world, tmp_path):
    r = run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "a"), label_column="label", head="probe",
                             probe=world["head"]))
    rows = pq.read_table(tmp_path / "a" / "ablation.parquet").to_pylist()
    assert (tmp_path / "a" / "ablation.png").exists() and (tmp_path / "a" / "report.html").exists()
    c, names = world["c"], [x.name for x in world["comps"]]
    y = np.array([["warm", "cool"].index(v) for v in world["cols"]["label"]])
    mu = c.mean(0)
    for row in rows:                      # every ablation set, recomputed by hand from the component names
        cc = c.copy()
        for n in row["components"]:
            cc[:, names.index(n)] = mu[names.index(n)]
        assert row["accuracy"] == pytest.approx(_acc(cc.sum(1), y, world["W"], world["b"]), abs=1e-9), row
    byk = {(x["curve"], x["kind"], x["layer"]): x for x in rows}
    base = rows[0]["accuracy"]
    assert rows[0]["curve"] == "baseline" and rows[0]["ablated"] == 0
    # planted: the background (block 0's MLP) decides half the images, so the baseline is near chance;
    # ablating that MLP alone leaves the label's head in charge; block 1 carries nothing
    assert base < 0.65 and byk[("per_layer", "mlp", "0")]["accuracy"] > 0.9
    assert byk[("per_layer", "attn", "2")]["accuracy"] < 0.6
    assert byk[("per_layer", "attn", "1")]["accuracy"] == pytest.approx(base, abs=0.01)
    # cumulative from the last layer: step 1 = block 2; mlp curve never touches heads
    assert byk[("cumulative", "all", "2")]["components"] == ["blocks.2.attn.head.0", "blocks.2.attn.head.1",
                                                            "blocks.2.mlp"]
    assert all("mlp" in n for x in rows if x["kind"] == "mlp" for n in x["components"])
    assert "bias" not in {n for x in rows for n in x["components"]}
    assert r["summary"]["baseline_accuracy"] == base


def test_ablation_masks_orders():
    comps = synthetic_components(blocks=2, heads=1)
    names = [c.name for c in comps]
    fwd = [s for s in ablation_masks(comps, names, "forward", ["all"]) if s["curve"] == "cumulative"]
    assert [s["layer"] for s in fwd] == [None, 0, 1]                  # embed first
    assert [names[i] for i in np.flatnonzero(fwd[1]["mask"])] == ["embed", "blocks.0.attn.head.0", "blocks.0.mlp"]
    rev = [s for s in ablation_masks(comps, names, "reverse", ["all"]) if s["curve"] == "cumulative"]
    assert [s["layer"] for s in rev] == [1, 0, None]


def test_probe_learns_the_planted_rule_and_round_trips(world, tmp_path):
    st = vd.open_store(world["store"])
    head, info = fit_probe(st, "label")
    assert head.classes == ["cool", "warm"] and info["train_accuracy"] > 0.9
    path = head.save(str(tmp_path / "p"))
    back = LinearHead.load(path)
    np.testing.assert_allclose(back.W, head.W) and np.testing.assert_allclose(back.b, head.b)
    z = world["c"].sum(1)
    y = label_indices(world["cols"]["label"], head.classes)
    assert _acc(z, y, back.W, back.b) == pytest.approx(info["train_accuracy"], abs=1e-9)


@pytest.mark.parametrize("ranking", ["compattribute", "signed"])
def test_mitigation_ablates_the_planted_spurious_component(world, tmp_path, ranking):
    out = tmp_path / "m"
    r = run_mitigate(MitigateConfig(store=world["store"], out=str(out), label_column="label", group_column="background",
                                 head="probe", probe=world["head"], properties=world["props"], spurious="bg",
                                 core="obj", k=1, ranking=ranking, split_column="split", fit_split=["val"],
                                 eval_split=["test"], random_draws=3))
    res, s = r["results"], r["summary"]
    assert res["ablated"] == ["blocks.0.mlp"]
    assert s["fit_rows"] == 400 and s["eval_rows"] == 400
    # before: the background decides conflicting groups; after: only the label's component does
    assert res["before"]["worst"] < 0.3 and res["after"]["worst"] > 0.85
    assert res["after"]["mean"] > res["before"]["mean"] + 0.2
    assert res["random"]["worst"] < res["after"]["worst"]
    # independent check on the test rows: replace blocks.0.mlp by its validation mean
    c, names = world["c"], [x.name for x in world["comps"]]
    val, test = np.arange(400), np.arange(400, 800)
    k = names.index("blocks.0.mlp")
    cc = c[test].copy()
    cc[:, k] = c[val, k].mean(0)
    y = np.array([["warm", "cool"].index(v) for v in world["cols"]["label"]])[test]
    g = np.array(world["cols"]["background"])[test]
    pred = (cc.sum(1) @ world["W"].T + world["b"]).argmax(1)
    for grp, acc in res["after"]["groups"].items():
        lab, bg = grp.split(" | ")
        sel = (y == ["warm", "cool"].index(lab)) & (g == bg)
        assert acc == pytest.approx(float((pred[sel] == y[sel]).mean()), abs=1e-9)
    for f in ("mitigation.parquet", "mitigation_components.parquet", "mitigation.png", "report.html"):
        assert (out / f).exists(), f
    comp_rows = pq.read_table(out / "mitigation_components.parquet").to_pylist()
    assert comp_rows[0]["component"] == "blocks.0.mlp" and comp_rows[0]["ablated"]
    if ranking == "compattribute":
        top = comp_rows[0]
        assert top["spurious"] > 0.9 and top["score"] == pytest.approx(top["spurious"] - top["core"])


def test_same_pool_protocol_and_hash_split(world, tmp_path):
    r = run_mitigate(MitigateConfig(store=world["store"], out=str(tmp_path / "s"), label_column="label",
                                 group_column="background", head="probe", probe=world["head"],
                                 properties=world["props"], spurious="bg", core="obj", k=2, protocol="same-pool",
                                 split_column="split", eval_split=["test"], random_draws=0))
    assert r["summary"]["fit_rows"] == r["summary"]["eval_rows"] == 400 and "random" not in r["results"]
    r2 = run_mitigate(MitigateConfig(store=world["store"], out=str(tmp_path / "h"), label_column="label",
                                  group_column="background", head="probe", probe=world["head"],
                                  properties=world["props"], spurious="bg", core="obj", k=1, random_draws=0))
    s = r2["summary"]
    assert s["fit_rows"] + s["eval_rows"] == 800 and 300 < s["fit_rows"] < 500      # hash split of the ids
    assert r2["results"]["ablated"] == ["blocks.0.mlp"]


def test_bad_inputs_say_how_to_fix(world, tmp_path):
    base = dict(store=world["store"], out=str(tmp_path / "e"), head="probe", probe=world["head"],
                properties=world["props"], spurious="bg", core="obj", split_column="split", fit_split=["val"],
                eval_split=["test"])
    with pytest.raises(InputError, match="label_column: 'lbl' is not a column.*pass-through columns"):
        run_mitigate(MitigateConfig(label_column="lbl", group_column="background", **base))
    with pytest.raises(InputError, match="group_column"):
        run_mitigate(MitigateConfig(label_column="label", group_column="", **base))
    with pytest.raises(InputError, match="unknown properties"):
        run_mitigate(MitigateConfig(label_column="label", group_column="background", **{**base, "spurious": "bgg"}))
    with pytest.raises(InputError, match="overlap"):
        run_mitigate(MitigateConfig(label_column="label", group_column="background", **{**base, "fit_split": ["val", "test"]}))
    with pytest.raises(InputError, match="no rows .* split in"):
        run_mitigate(MitigateConfig(label_column="label", group_column="background", **{**base, "eval_split": ["tst"]}))
    with pytest.raises(InputError, match="k: must be between"):
        run_mitigate(MitigateConfig(label_column="label", group_column="background", k=99, **base))
    with pytest.raises(InputError, match="head: must be one of"):
        run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "e2"), label_column="label", head="svm"))
    with pytest.raises(InputError, match="no linear classifier head"):
        run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "e3"), label_column="label", head="model"))


def test_aligner_for_another_store_is_refused(world, tmp_path):
    import torch as _t

    from vitdecomp.fit.compalign import Aligner

    a = Aligner(["embed"], _t.zeros(1, 4, 4), _t.zeros(4), {"model": {"name": "timm:other"}, "store": "/x",
                                                             "store_manifest_sha256": "0" * 64})
    a.save(str(tmp_path / "al"))
    with pytest.raises(InputError, match="the aligner was trained for timm:other"):
        run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "e4"), label_column="label",
                             aligner=str(tmp_path / "al")))


def test_cli_parses_query_options():
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args

    a = build_parser().parse_args(["query", "mitigate", "--store", "s", "--out", "o", "--label-column", "label",
                                   "--group-column", "bg", "--fit-split", "val", "--eval-split", "test", "other",
                                   "--k", "3", "--ranking", "signed", "--protocol", "same-pool"])
    c = config_from_args(a, MitigateConfig)
    assert (c.k, c.fit_split, c.eval_split, c.ranking, c.protocol) == (3, ["val"], ["test", "other"], "signed",
                                                                        "same-pool")
    a = build_parser().parse_args(["query", "ablate", "--store", "s", "--out", "o", "--label-column", "y",
                                   "--kinds", "attn", "mlp", "--order", "forward"])
    c = config_from_args(a, AblateConfig)
    assert c.kinds == ["attn", "mlp"] and c.order == "forward"


def test_zero_shot_head_is_the_class_texts(world, tmp_path):
    r = run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "z"), label_column="label",
                             class_names=["warm", "cool"], kinds=["mlp"]))
    assert r["head"].kind == "zeroshot" and r["head"].classes == ["warm", "cool"]
    torch.manual_seed(0)                                   # the job's random-init text tower: seed 0
    T = encode_texts(vd.load_model(TOY_CLIP), ["warm", "cool"])
    np.testing.assert_allclose(r["head"].W, T, atol=1e-6)
    y = np.array([["warm", "cool"].index(v) for v in world["cols"]["label"]])
    base = float(((world["c"].sum(1) @ T.T).argmax(1) == y).mean())
    assert r["rows"][0]["accuracy"] == pytest.approx(base, abs=1e-9)


def test_ablate_fits_its_probe_on_other_rows(world, tmp_path):
    r = run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "p"), label_column="label", head="probe",
                             split_column="split", eval_split=["test"], kinds=["mlp"]))
    assert r["head"].kind == "probe" and r["head"].meta["rows"] == 400          # fitted on the val rows only
    assert (tmp_path / "p" / "probe.safetensors").exists() and r["summary"]["images"] == 400
    with pytest.raises(InputError, match="rows of its own"):
        run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "q"), label_column="label", head="probe",
                             split_column="split", eval_split=["test"], fit_split=["test"]))


def test_waterbirds_lists_are_known_by_name(tmp_path):
    from vitdecomp.query.compattribute import DEFAULT_PROPERTIES, named_properties, read_properties

    p = named_properties(None)
    assert p["Waterbirds core"][:2] == ["bird", "finch"] and len(p["Waterbirds spurious"]) == 9
    assert set(read_properties(None)) == set(DEFAULT_PROPERTIES)            # not scored by default
    f = tmp_path / "p.yaml"
    f.write_text("Waterbirds core: [duck]\n")
    assert named_properties(str(f))["Waterbirds core"] == ["duck"]           # a user file overrides


def test_a_probe_fitted_or_evaluated_on_few_images_per_class_is_warned_about(world, directions, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="vitdecomp")
    run_ablate(AblateConfig(store=world["store"], out=str(tmp_path / "ok"), label_column="label", head="probe",
                            split_column="split", eval_split=["test"], kinds=["mlp"]))
    assert "unreliable" not in caplog.text                       # 400 rows per split: ~200 per class
    comps, c, cols, _ = planted(directions, n=24, seed=3)
    small = write_store(tmp_path / "small", c.astype(np.float32), comps, dict(cols))
    run_ablate(AblateConfig(store=small, out=str(tmp_path / "few"), label_column="label", head="probe",
                            split_column="split", eval_split=["test"], kinds=["mlp"]))
    fitted = [r.getMessage() for r in caplog.records if "probe is fitted on 12 images" in r.getMessage()]
    evaluated = [r.getMessage() for r in caplog.records if "accuracy is evaluated on 12 images" in r.getMessage()]
    assert fitted and evaluated, caplog.text
    assert "fewer than 20 in class(es) 'cool' (" in fitted[0] and "use more labelled images" in fitted[0]
