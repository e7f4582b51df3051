"""CompAttribute's score options (docs/method.md “CompAttribute”, “Score options”): ``correlation`` (the
published score), ``specific`` and ``variance-share``, each against an independent numpy computation, on
arrays, streamed partitions, a store (in this process and with Ray), through ``query compattribute`` and
``query mitigate``; and the case that motivates them (a component carrying most of the total's variance
is the correlation's top component for every property)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import vitdecomp as vd
from vitdecomp.errors import InputError
from vitdecomp.query.compattribute import SCORES, Sums, basis, scores


def by_hand(c: np.ndarray, Qs: list, score: str, idx=None) -> np.ndarray:
    """``[K', P]`` straight from the definitions with numpy's corrcoef/cov (``s_a`` over every component)."""
    tot = c.sum(1)
    idx = range(c.shape[1]) if idx is None else idx
    v = np.zeros((len(idx), len(Qs)))
    for j, Q in enumerate(Qs):
        for i, k in enumerate(idx):
            per = []
            for q in Q:
                s, p = tot @ q, c[:, k] @ q
                if score == "variance-share":
                    per.append(np.cov(s, p)[0, 1] / np.var(s, ddof=1))
                else:
                    per.append(np.corrcoef(s, p)[0, 1])
            v[i, j] = np.mean(per)
    if score == "specific":
        v = np.stack([v[:, j] - np.maximum(0, np.delete(v, j, axis=1).max(1)) for j in range(v.shape[1])], 1)
    return v


def _data(seed=0, n=240, K=6, d=12):
    rng = np.random.default_rng(seed)
    E = {"a": rng.normal(size=(3, d)), "b": rng.normal(size=(2, d)), "c": rng.normal(size=(1, d))}
    c = rng.normal(size=(n, K, d))
    c[:, 1] += rng.normal(size=(n, 3)) * 3 @ basis(E["a"])
    c[:, 4] += rng.normal(size=(n, 2)) * 2 @ basis(E["b"])
    return c, E


@pytest.mark.parametrize("score", SCORES)
def test_every_score_equals_numpy_on_arrays_and_merged_partitions(score):
    c, E = _data()
    Qs = [basis(e) for e in E.values()]
    want = by_hand(c, Qs, score)
    names = [f"k{i}" for i in range(c.shape[1])]
    _, sc, _ = vd.query.compattribute(c, properties=E, names=names, score=score, batch_size=37)
    np.testing.assert_allclose(sc, want, atol=1e-10)
    parts = [Sums.of(c[a:b], np.concatenate(Qs)) for a, b in ((0, 1), (1, 100), (100, 240))]
    np.testing.assert_allclose(scores(parts[0] + parts[1] + parts[2], [len(q) for q in Qs], score), want, atol=1e-10)
    # a subset of components is scored against the total of all of them
    _, sub, _ = vd.query.compattribute(c, properties=E, names=names, components=["k1", "k4"], score=score)
    np.testing.assert_allclose(sub, by_hand(c, Qs, score, idx=[1, 4]) if score != "specific" else
                               by_hand(c, Qs, "specific")[[1, 4]], atol=1e-10)


def test_variance_shares_sum_to_one_and_the_options_differ():
    c, E = _data(1)
    names = [f"k{i}" for i in range(c.shape[1])]
    _, vs, _ = vd.query.compattribute(c, properties=E, names=names, score="variance-share")
    np.testing.assert_allclose(vs.sum(0), 1.0, atol=1e-10)          # Σ_k Cov(s, p_k) = Var(s)
    _, r, _ = vd.query.compattribute(c, properties=E, names=names)
    assert not np.allclose(r, vs, atol=1e-3)
    with pytest.raises(InputError, match="unknown CompAttribute score 'pearson'.*correlation, specific, variance-share"):
        vd.query.compattribute(c, properties=E, names=names, score="pearson")


def test_specific_rank_separates_a_component_that_carries_most_of_the_total():
    """The toy world's diagnosis in miniature: one component carries most of the total's variance in every
    direction, so it correlates best with the total for every property; the specific rank (and the
    per-property components' variance share within their own property) names the carriers."""
    rng = np.random.default_rng(2)
    n, d = 600, 16
    Ea, Eb = rng.normal(size=(2, d)), rng.normal(size=(2, d))
    c = 0.1 * rng.normal(size=(n, 4, d))
    c[:, 0] += 3 * rng.normal(size=(n, d))                       # the big follower: every direction
    c[:, 1] += 1.5 * rng.normal(size=(n, 2)) @ basis(Ea)         # property a
    c[:, 2] += 1.5 * rng.normal(size=(n, 2)) @ basis(Eb)         # property b
    props = {"a": Ea, "b": Eb}
    names = ["big", "a_carrier", "b_carrier", "noise"]
    _, r, _ = vd.query.compattribute(c, properties=props, names=names)
    assert [names[i] for i in r.argmax(0)] == ["big", "big"]
    _, sp, _ = vd.query.compattribute(c, properties=props, names=names, score="specific")
    assert [names[i] for i in sp.argmax(0)] == ["a_carrier", "b_carrier"]


@pytest.mark.slow
def test_store_paths_in_process_and_with_ray_equal_the_array_path(tmp_path):
    from jobutil import synthetic_components, write_store

    comps = synthetic_components(blocks=2, heads=2)
    rng = np.random.default_rng(4)
    c = rng.normal(size=(50, len(comps), 16)).astype(np.float32)
    props = {"x": rng.normal(size=(2, 16)), "y": rng.normal(size=(3, 16))}
    c[:, 2] += (rng.normal(size=(50, 2)) * 3 @ basis(props["x"])).astype(np.float32)
    st = vd.open_store(write_store(tmp_path / "s", c, comps))
    Qs = [basis(e) for e in props.values()]
    c64 = c.astype(np.float64)
    for score in SCORES:           # the score is taken from the merged sums: one Ray pass checks that path
        want = by_hand(c64, Qs, score)
        for distributed in (False, True) if score == "variance-share" else (False,):
            _, sc, _ = vd.query.compattribute(st, None, props, distributed=distributed, score=score, batch_size=16)
            np.testing.assert_allclose(sc, want, atol=1e-5, err_msg=f"{score} distributed={distributed}")


def test_query_compattribute_job_and_cli_take_the_score(tmp_path):
    import yaml

    from jobutil import synthetic_components, write_store
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args
    from vitdecomp.config import CompAttributeConfig, MitigateConfig, OptionError
    from vitdecomp.query.jobs import run_compattribute

    a = build_parser().parse_args(["query", "compattribute", "--store", "s", "--out", "o", "--score", "specific"])
    assert config_from_args(a, CompAttributeConfig).score == "specific"
    a = build_parser().parse_args(["query", "mitigate", "--store", "s", "--out", "o", "--label-column", "y",
                                   "--score", "variance-share"])
    assert config_from_args(a, MitigateConfig).score == "variance-share"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["query", "compattribute", "--store", "s", "--out", "o", "--score", "pearson"])
    with pytest.raises(OptionError, match="score.*compattribute ranking only"):
        MitigateConfig(store="s", out="o", label_column="y", ranking="signed", score="specific").validate()

    comps = synthetic_components(blocks=2, heads=2)
    rng = np.random.default_rng(5)
    c = rng.normal(size=(40, len(comps), 64)).astype(np.float32)
    st = write_store(tmp_path / "s", c, comps)
    # property embeddings come from the store's text model; get the same directions here
    import torch

    from vitdecomp.fit.text import encode_texts
    from vitdecomp.toyworld.registry import TOY_CLIP

    texts = {"p": ["water", "land"], "q": ["a warm object"]}
    (tmp_path / "props.yaml").write_text(yaml.safe_dump(texts))
    r = run_compattribute(CompAttributeConfig(store=st, out=str(tmp_path / "o"), properties=str(tmp_path / "props.yaml"),
                                              distributed=False, score="variance-share",
                                              cache_dir=str(tmp_path / "cache")))
    torch.manual_seed(0)
    clip = vd.load_model(TOY_CLIP)
    order = r["properties"]
    Qs = [basis(encode_texts(clip, texts[p])) for p in ("p", "q")]
    want = by_hand(c.astype(np.float64), Qs, "variance-share")
    got = r["scores"][:, [order.index("p"), order.index("q")]]
    np.testing.assert_allclose(got, want, atol=1e-5)
    meta = json.loads((tmp_path / "o" / "compattribute.json").read_text())
    assert meta["score"] == "variance-share"
    rows = pq.read_table(tmp_path / "o" / "compattribute.parquet").to_pylist()
    k = [x.name for x in comps].index("blocks.1.mlp")
    row = next(x for x in rows if x["component"] == "blocks.1.mlp" and x["property"] == "p")
    assert row["score"] == pytest.approx(want[k, 0], abs=1e-5)


def test_query_mitigate_ranks_by_the_chosen_score(tmp_path):
    """``query mitigate --score``: the components table's spurious/core columns are that score on the fit
    rows over the two properties, and the ranking is their difference."""
    import torch
    import yaml

    from jobutil import synthetic_components, write_store
    from vitdecomp.config import MitigateConfig
    from vitdecomp.fit.probe import LinearHead
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.query.jobs import run_mitigate
    from vitdecomp.toyworld.registry import TOY_CLIP

    texts = {"bg": ["water"], "obj": ["a warm object"]}
    torch.manual_seed(0)
    clip = vd.load_model(TOY_CLIP)
    Qs = [basis(encode_texts(clip, texts[p])) for p in ("bg", "obj")]
    comps = synthetic_components()
    names = [x.name for x in comps]
    rng = np.random.default_rng(6)
    n = 400
    y = rng.integers(0, 2, n)
    g = np.where(rng.random(n) < 0.5, y, 1 - y)
    c = 0.05 * rng.normal(size=(n, len(comps), 64))
    c[:, names.index("blocks.0.mlp")] += np.outer(np.where(g == 1, 1.5, -1.5), Qs[0][0])
    c[:, names.index("blocks.1.mlp")] += np.outer(rng.normal(size=n), Qs[0][0] + Qs[1][0])
    c = c.astype(np.float32)
    cols = {"label": [("warm", "cool")[v] for v in y], "background": [("water", "land")[v] for v in g],
            "split": ["val" if i < n // 2 else "test" for i in range(n)]}
    st = write_store(tmp_path / "s", c, comps, dict(cols))
    W = np.stack([-Qs[0][0], Qs[0][0]])
    LinearHead("probe", ["warm", "cool"], W, np.zeros(2), "native").save(str(tmp_path / "head"))
    (tmp_path / "props.yaml").write_text(yaml.safe_dump(texts))
    val = c[: n // 2].astype(np.float64)
    for score in SCORES:
        out = tmp_path / score
        r = run_mitigate(MitigateConfig(store=st, out=str(out), label_column="label", group_column="background",
                                        head="probe", probe=str(tmp_path / "head"), properties=str(tmp_path / "props.yaml"),
                                        spurious="bg", core="obj", k=1, score=score, split_column="split",
                                        fit_split=["val"], eval_split=["test"], random_draws=0,
                                        cache_dir=str(tmp_path / "cache")))
        want = by_hand(val, Qs, score)
        rows = pq.read_table(out / "mitigation_components.parquet").to_pylist()
        for row in rows:
            k = names.index(row["component"])
            assert row["spurious"] == pytest.approx(want[k, 0], abs=1e-5), (score, row)
            assert row["core"] == pytest.approx(want[k, 1], abs=1e-5), (score, row)
            assert row["score"] == pytest.approx(want[k, 0] - want[k, 1], abs=1e-5)
        assert r["summary"]["score"] == score
        assert r["results"]["ablated"] == [rows[0]["component"]]
