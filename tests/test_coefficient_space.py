"""Fit and query in coefficient space (README “Store layout”): a compact store and a full store of the
same contributions give the same TextSpan picks, CompAttribute scores and ablation results, and the
coefficient-space moments equal the moments of the decoded vectors."""
from __future__ import annotations

import numpy as np
import pytest

import vitdecomp as vd
from conftest import images_for, model
from vitdecomp.config import DecomposeOptions
from vitdecomp.fit.probe import LinearHead
from vitdecomp.fit.textspan import Moments, moments_from_store, textspan
from vitdecomp.query.ablation import ablation_masks, component_means, evaluate_ablations
from vitdecomp.query.compattribute import compattribute
from vitdecomp.store import Store, open_store
from vitdecomp.store.compact import build_manifest
from vitdecomp.store.synthetic import planted_directions, write_synthetic_store

SHAPE = dict(d=48, blocks=2, heads=3, head_dim=8, seed=5, batch_rows=256)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("coef")
    a = write_synthetic_store(str(root / "c"), 900, layout="compact", **SHAPE)
    b = write_synthetic_store(str(root / "f"), 900, layout="full", dtype="fp32", **SHAPE)
    return a, b


def texts_for(st, extra: int = 30, seed: int = 0) -> np.ndarray:
    """A text pool: the planted directions (slightly perturbed) among random unit vectors."""
    g = np.random.default_rng(seed)
    dirs = planted_directions(st)
    t = np.concatenate([dirs + 0.05 * g.normal(size=dirs.shape), g.normal(size=(extra, st.manifest["d"]))])
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def decoded_moments(st, names) -> Moments:
    """The reference: moments of the decoded d-vectors (the full path's formula)."""
    tot = None
    for b in st.iter_batches(components=names, dtype=np.float64, batch_size=200):
        m = Moments.of(b.contributions)
        tot = m if tot is None else tot + m
    return tot


def test_coefficient_moments_equal_decoded_moments(pair):
    st, _ = pair
    names = st.names
    got = moments_from_store(st, names, distributed=False, batch_size=200)
    want = decoded_moments(st, names)
    assert got.n == want.n == 900
    np.testing.assert_allclose(got.sum, want.sum, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.xtx, want.xtx, rtol=1e-7, atol=1e-7 * np.abs(want.xtx).max())


def test_shifted_float32_moments_are_exact(pair):
    """``CoefficientMoments.add32`` (each block shifted by a reference row, the shift undone in float64)
    equals ``add`` (no shift) to float64 rounding when given float64 blocks, merged across workers
    (``+``) and through bytes too; given float32 blocks of a large-mean component, the shift keeps the
    covariance ``XᵀX − nμμᵀ`` to float32 accuracy where an unshifted float32 Gram loses it."""
    from vitdecomp.store.compact import CoefficientMoments

    st, _ = pair
    lay = st.compact_layout
    names = st.names
    ref, parts = CoefficientMoments(names), []
    for b in st.iter_batches(components=names, dtype=np.float64, batch_size=256, coefficients=True):
        ref.add(b.coefficients, b.full, b.offset, lay)
        parts.append(CoefficientMoments(names).add32({k: v.copy() for k, v in b.coefficients.items()},
                                                     {k: v.copy() for k, v in b.full.items()}, b.offset, lay))
    merged = parts[0]
    for p in parts[1:]:
        merged = merged + CoefficientMoments.from_bytes(p.to_bytes())
    one = CoefficientMoments(names)
    for b in st.iter_batches(components=names, dtype=np.float64, batch_size=256, coefficients=True):
        one.add32(dict(b.coefficients), dict(b.full), b.offset, lay)
    want = ref.moments(lay, st.manifest["d"])
    for got in (merged.moments(lay, st.manifest["d"]), one.moments(lay, st.manifest["d"])):
        assert got[0] == want[0] == 900
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-11, atol=1e-9)
    g = np.random.default_rng(0)
    x64 = 300.0 + g.normal(size=(4096, 16))                       # mean ≫ spread: the hard case for float32
    x32 = x64.astype(np.float32)
    exact = np.cov(x32.astype(np.float64), rowvar=False, bias=True) * len(x32)
    sh = CoefficientMoments(["x"]).add32({}, {"x": x32.copy()}, None, None)
    n, s, xtx = sh.moments(None, 16)
    cov = xtx[0] - np.outer(s[0], s[0]) / n
    plain = (x32.T @ x32).astype(np.float64) - np.outer(x32.sum(0, dtype=np.float64), x32.sum(0, dtype=np.float64)) / n
    err = np.abs(cov - exact).max() / np.abs(exact).max()
    assert err < 1e-5 < np.abs(plain - exact).max() / np.abs(exact).max()


def test_textspan_picks_identical_and_planted(pair):
    a, b = pair
    heads = [c.name for c in a.components if c.kind == "head"]
    T = texts_for(a)
    # rank = the heads' rank: beyond it the "top singular vectors" of X are an arbitrary basis of its null
    # space (exact zeros in coefficient space, rounding noise in a stored vector), which TextSpan must not use
    ta, ra = textspan(a, heads, T, m=4, rank=SHAPE["head_dim"])
    tb, rb = textspan(b, heads, T, m=4, rank=SHAPE["head_dim"])
    for h in heads:
        assert ra[h].picks == rb[h].picks, h
        np.testing.assert_allclose(ra[h].variance_explained, rb[h].variance_explained, rtol=1e-3, atol=1e-4)
    for head, p in a.manifest["source"]["planted"].items():
        assert ra[head].picks[0] == p                       # the planted property's text comes first


def test_compattribute_within_1e5(pair):
    a, b = pair
    props = {"p0": planted_directions(a)[:1], "rand": np.random.default_rng(1).normal(size=(3, a.manifest["d"]))}
    _, sa, na = compattribute(a, None, props, distributed=False, batch_size=128)
    _, sb, nb = compattribute(b, None, props, distributed=False, batch_size=128)
    assert na == nb
    np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-5)
    # a subset is scored against the total over every component (the readout)
    sub = [n for n in a.names if "head" in n][:3]
    _, sa2, _ = compattribute(a, None, props, components=sub, distributed=False)
    _, sb2, _ = compattribute(b, None, props, components=sub, distributed=False)
    np.testing.assert_allclose(sa2, sb2, rtol=0, atol=1e-5)
    planted = a.manifest["source"]["planted"]
    k = na.index(next(h for h, p in planted.items() if p == 0))
    assert sa[k, 0] == sa[:, 0].max()


def test_ablation_means_and_predictions_agree(pair):
    a, b = pair
    dirs = planted_directions(a)
    head = LinearHead("probe", ["neg", "pos"], np.stack([-dirs[0], dirs[0]]), np.zeros(2))
    names = a.names
    ma = component_means(a, names, head, None)
    mb = component_means(b, names, head, None)
    np.testing.assert_allclose(ma, mb, rtol=0, atol=1e-5)
    masks = {i: s["mask"] for i, s in enumerate(ablation_masks(a.components, names))}
    ea = evaluate_ablations(a, names, head, masks, ma, None, "label", "group")
    eb = evaluate_ablations(b, names, head, masks, mb, None, "label", "group")
    assert (ea["labels"] == eb["labels"]).all() and ea["groups"] == eb["groups"]
    for m in masks:
        assert (ea["pred"][m] != eb["pred"][m]).mean() <= 0.002, m     # fp16 ties at the boundary at most


@pytest.mark.parametrize("convention", ["centered", "uniform"])
def test_real_model_compact_vs_full(tmp_path, convention):
    """A decomposed tiny ViT in both layouts (fp32): moments and CompAttribute agree; uniform uses the offset."""
    lm = model("timm:deit_tiny_patch16_224")
    dec = vd.decompose(lm, images_for(lm, batch=6), blocks=[10, 11], convention=convention)
    stores = {}
    for layout in ("compact", "full"):
        m, basis = build_manifest(lm, options=DecomposeOptions(convention=convention, dtype="fp32", blocks="10-11"),
                                  layout=layout)
        Store.create(tmp_path / layout, m, basis=basis).append(dec, [f"i{k}" for k in range(6)])
        stores[layout] = open_store(str(tmp_path / layout))
    c, f = stores["compact"], stores["full"]
    assert c.layout == "compact" and (c.compact_layout.needs_offset == (convention == "uniform"))
    mc = moments_from_store(c, c.names, distributed=False)
    mf = moments_from_store(f, f.names, distributed=False)
    np.testing.assert_allclose(mc.xtx, mf.xtx, rtol=0, atol=1e-5 * np.abs(mf.xtx).max())
    props = {"r": np.random.default_rng(0).normal(size=(4, c.manifest["d"]))}
    _, sc, _ = compattribute(c, None, props, distributed=False)
    _, sf, _ = compattribute(f, None, props, distributed=False)
    np.testing.assert_allclose(sc, sf, rtol=0, atol=1e-5)


def test_distributed_passes_in_coefficient_space(ray_local, pair):
    a, b = pair
    heads = [c.name for c in a.components if c.kind == "head"]
    md = moments_from_store(a, heads, distributed=True, batch_size=300)
    ml = moments_from_store(a, heads, distributed=False)
    np.testing.assert_allclose(md.xtx, ml.xtx, rtol=1e-9, atol=1e-9)
    props = {"p": planted_directions(a)[:3]}
    _, sd, _ = compattribute(a, None, props, distributed=True, batch_size=300)
    _, sf, _ = compattribute(b, None, props, distributed=True, batch_size=300)
    np.testing.assert_allclose(sd, sf, rtol=0, atol=1e-5)
    # to_ray decodes a compact store's columns to d-vectors
    col = a.columns_for([heads[0]])[0]
    rows = a.to_ray(columns=["image_id", col]).take(3)
    got = {r["image_id"]: np.asarray(r[col]) for r in rows}
    ref = {i: v for bt in a.iter_batches(components=[heads[0]], ids=list(got)) for i, v in zip(bt.ids, bt.contributions[:, 0])}
    for i in got:
        np.testing.assert_allclose(got[i], ref[i], rtol=0, atol=1e-6)


def test_stream_parts_equal_iter_batches(pair):
    """The float32 streaming reader of the local passes gives, batch for batch, what ``iter_batches``
    gives (fp16 and fp32 stores, reused buffers, a row subset, pass-through columns, the readout)."""
    from vitdecomp.store.stream import _Widen, stream_parts

    for st in pair:
        names = st.names
        ids = [f"img-{i:07d}" for i in range(3, 900, 7)]
        got = list(stream_parts(st, names, readout=True, columns=["label"], with_ids=True, batch_size=50))
        assert sum(b.n for b in got) == 900 and max(b.n for b in got) <= 50
        # the buffers are reused: check each batch as it comes
        ref = st.iter_batches(components=names, batch_size=50, columns=["label"], coefficients=True)
        for b, r in zip(stream_parts(st, names, readout=True, columns=["label"], with_ids=True, batch_size=50), ref):
            assert b.ids.to_pylist() == r.ids and b.columns["label"].to_pylist() == r.columns["label"].to_pylist()
            for n in names:
                want = r.coefficients[n] if n in r.coefficients else r.full[n]
                have = b.coef[n] if n in b.coef else b.full[n]
                assert have.dtype == np.float32 and np.array_equal(have, want), n
            assert np.array_equal(b.readout, r.readout)
        sub = list(stream_parts(st, names[:2], ids=ids))
        assert sum(b.n for b in sub) == len(ids)
    import pyarrow as pa

    w = _Widen()
    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(40, dtype=np.float16)), 4)
    for part in (arr, arr.slice(3, 5), arr.slice(0, 0)):
        assert np.array_equal(w("c", part), np.arange(40, dtype=np.float32).reshape(10, 4)[part.offset:part.offset + len(part)])
