"""Streaming TextSpan equals a direct in-memory TextSpan; moments merge exactly; planted texts found."""
from __future__ import annotations

import numpy as np
import pytest

from vitdecomp.errors import InputError
from vitdecomp.fit.textspan import Moments, textspan, textspan_batched, textspan_one


def direct_textspan(X: np.ndarray, T: np.ndarray, m: int, rank: int):
    """docs/method.md “TextSpan” on the data matrix itself (no moments): SVD, projection, deflation of C and texts.
    Returns the picks, the reconstruction ``[N, d]`` and the variance explained after each pick."""
    _, _, vt = np.linalg.svd(X, full_matrices=False)          # right singular vectors of the uncentred X
    V = vt[:rank].T
    T = T @ V @ V.T
    mean = X.mean(0)
    C = X - mean
    total = (C ** 2).sum()
    recon = np.tile(mean, (len(X), 1))
    picks, ve = [], []
    for _ in range(m):
        std = (C @ T.T).std(0, ddof=1)
        best = int(np.argmax(std))
        picks.append(best)
        t = T[best]
        coef = C @ t / (t @ t)
        recon = recon + coef[:, None] * t[None]
        C = C - coef[:, None] * t[None]
        T = T - (T @ t / (t @ t))[:, None] * t[None]
        ve.append(1.0 - (C ** 2).sum() / total)
    return picks, recon, ve


def planted(seed=0, n=400, d=32, p=60, k=5):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(p, d))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    hidden = rng.choice(p, k, replace=False)
    scales = np.linspace(5, 2, k)
    X = rng.normal(size=(n, k)) * scales @ T[hidden] + 0.05 * rng.normal(size=(n, d)) + rng.normal(size=d)
    return X, T, hidden


def test_streaming_equals_direct_and_recovers_planted_texts():
    X, T, hidden = planted()
    m, rank = 5, 20
    mo = Moments.of(X[:, None])
    res = textspan_one(mo.n, mo.mean[0], mo.xtx[0], T, m=m, rank=rank)
    picks, recon, direct_ve = direct_textspan(X, T, m, rank)
    assert res.picks == picks
    assert set(res.picks) == set(hidden.tolist())          # the planted directions, strongest first
    assert res.picks[0] == hidden[0]
    Q = res.basis.T
    ours = res.mean + (X - res.mean) @ Q @ Q.T
    assert np.abs(ours - recon).max() <= 1e-5 * np.abs(recon).max()
    ve = res.variance_explained
    assert all(a < b for a, b in zip(ve, ve[1:])) and 0.95 < ve[-1] <= 1.0
    # variance explained is what the reconstruction keeps of the centred data
    C = X - X.mean(0)
    kept = ((C @ Q @ Q.T) ** 2).sum() / (C ** 2).sum()
    assert abs(ve[-1] - kept) < 1e-9
    np.testing.assert_allclose(ve, direct_ve, atol=1e-9)


def test_moments_merged_from_partitions_equal_moments_of_the_whole():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 3, 8))
    parts = [Moments.of(x[a:b]) for a, b in ((0, 10), (10, 57), (57, 103))]
    merged = parts[0] + parts[1] + parts[2]
    whole = Moments.of(x)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.xtx, whole.xtx, rtol=1e-12)
    np.testing.assert_allclose(merged.covariance_sum()[1], np.cov(x[:, 1].T, ddof=0) * 103, rtol=1e-9)
    A = rng.normal(size=(3, 5, 8))
    aligned = whole.aligned(A)
    direct = Moments.of(np.einsum("kod,bkd->bko", A, x))
    np.testing.assert_allclose(aligned.xtx, direct.xtx, rtol=1e-9)
    assert Moments.from_bytes(whole.to_bytes()).n == 103


def test_table_and_errors():
    X, T, hidden = planted(seed=2, d=16, p=30, k=3)
    X2, _, _ = planted(seed=3, d=16, p=30, k=3)
    X3 = np.random.default_rng(4).normal(size=X.shape) * np.linspace(3, 0.1, 16) + 1.0   # no planted texts
    data = np.stack([X, X2, X3], 1)
    mo = Moments.of(data)
    pool = [f"text {i}" for i in range(len(T))]
    table, res = textspan(mo, ["a", "b", "c"], T, pool, m=3, rank=10)
    rows = table.to_pylist()
    assert [r["component"] for r in rows] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert {r["text"] for r in rows[:3]} == {f"text {i}" for i in hidden}
    both = textspan_batched(mo.n, mo.mean, mo.xtx, T, m=3, rank=10)
    # every component against docs/method.md “TextSpan” written out on its raw data (SVD of X, not the moments)
    for k, name in enumerate(["a", "b", "c"]):
        picks, _, ve = direct_textspan(data[:, k], T, 3, 10)
        mine = [r for r in rows if r["component"] == name]
        assert [r["text_index"] for r in mine] == picks == both[k].picks == res[name].picks
        assert [r["text"] for r in mine] == [pool[i] for i in picks]
        np.testing.assert_allclose([r["cumulative"] for r in mine], ve, atol=1e-9)
        np.testing.assert_allclose(both[k].variance_explained, ve, atol=1e-9)
        np.testing.assert_allclose([r["variance_explained"] for r in mine], np.diff(np.r_[0.0, ve]), atol=1e-9)
    with pytest.raises(InputError, match="aligner"):
        textspan(mo, ["a", "b", "c"], T[:, :8], pool)
    with pytest.raises(InputError, match="3 components need their 3 names"):
        textspan(mo, ["a", "b"], T, pool)
    with pytest.raises(InputError, match="at least two"):
        textspan_one(1, X[0], np.outer(X[0], X[0]), T)


def test_python_api_on_arrays_decompositions_and_stores_agree(tmp_path):
    """``vd.fit.textspan`` on an array ``[n, K, d]``, a torch tensor, a Decomposition and a store of the
    same contributions gives the same picks and variance explained as on their moments."""
    import torch

    import vitdecomp as vd
    import vitdecomp.toyworld  # noqa: F401  (registers the toy CLIP that write_store records)
    from jobutil import synthetic_components, write_store

    comps = synthetic_components(blocks=2, heads=2)
    names = [c.name for c in comps]
    rng = np.random.default_rng(5)
    _, T, _ = planted(seed=6, d=16, p=30, k=3)
    data = np.stack([planted(seed=10 + k, n=120, d=16, p=30, k=3)[0] for k in range(len(comps))], 1)
    data = data.astype(np.float32) + rng.normal(size=(1, len(comps), 16)).astype(np.float32)
    pool = [f"description {i}" for i in range(len(T))]
    want_table, want = textspan(Moments.of(data), names, T, pool, m=4, rank=12)
    assert vd.fit.textspan is textspan

    def same(table, res, chosen=names):
        want_rows = [r for r in want_table.to_pylist() if r["component"] in chosen]
        assert [(r["component"], r["text"]) for r in table.to_pylist()] == \
            [(r["component"], r["text"]) for r in want_rows]
        for n in chosen:
            assert res[n].picks == want[n].picks
            np.testing.assert_allclose(res[n].variance_explained, want[n].variance_explained, atol=1e-9)

    same(*vd.fit.textspan(data, names=names, texts=T, pool=pool, m=4, rank=12))
    same(*vd.fit.textspan(torch.from_numpy(data), names, torch.from_numpy(T), pool, m=4, rank=12))
    dec = type("Dec", (), {"names": names, "contributions": torch.from_numpy(data)})()
    same(*vd.fit.textspan(dec, texts=T, pool=pool, m=4, rank=12))
    same(*vd.fit.textspan(dec, names[3:5], T, pool, m=4, rank=12), names[3:5])
    st = vd.open_store(write_store(tmp_path / "s", data, comps))
    same(*vd.fit.textspan(st, texts=T, pool=pool, m=4, rank=12, batch_size=50))
    same(*vd.fit.textspan(st, names[1:3], T, pool, m=4, rank=12), names[1:3])
    table, _ = vd.fit.textspan(data, names=names, texts=T, m=1, rank=12)          # pool defaults to indices
    assert table.column("text").to_pylist()[0] == f"text {want[names[0]].picks[0]}"
    with pytest.raises(InputError, match="needs names="):
        vd.fit.textspan(data, texts=T)
    with pytest.raises(InputError, match=r"must be \[n, K, d\]"):
        vd.fit.textspan(data[0], names=names, texts=T)
    with pytest.raises(InputError, match="texts: pass the unit text embeddings"):
        vd.fit.textspan(data, names=names)
