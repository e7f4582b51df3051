"""Streaming TextSpan equals a direct in-memory TextSpan; moments merge exactly; planted texts found."""
from __future__ import annotations

import numpy as np
import pytest

from vitdecomp.errors import InputError
from vitdecomp.fit.textspan import Moments, textspan, textspan_batched, textspan_one


def direct_textspan(X: np.ndarray, T: np.ndarray, m: int, rank: int):
    """SPEC §5 on the data matrix itself (no moments): SVD, projection, deflation of C and texts."""
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    V = vt[:rank].T
    T = T @ V @ V.T
    mean = X.mean(0)
    C = X - mean
    recon = np.tile(mean, (len(X), 1))
    picks = []
    for _ in range(m):
        std = (C @ T.T).std(0, ddof=1)
        best = int(np.argmax(std))
        picks.append(best)
        t = T[best]
        coef = C @ t / (t @ t)
        recon = recon + coef[:, None] * t[None]
        C = C - coef[:, None] * t[None]
        T = T - (T @ t / (t @ t))[:, None] * t[None]
    return picks, recon


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
    picks, recon = direct_textspan(X, T, m, rank)
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
    mo = Moments.of(np.stack([X, X2], 1))
    pool = [f"text {i}" for i in range(len(T))]
    table, res = textspan(mo, ["a", "b"], T, pool, m=3, rank=10)
    rows = table.to_pylist()
    assert [r["component"] for r in rows] == ["a"] * 3 + ["b"] * 3
    assert {r["text"] for r in rows[:3]} == {f"text {i}" for i in hidden}
    assert abs(sum(r["variance_explained"] for r in rows[:3]) - rows[2]["cumulative"]) < 1e-12
    both = textspan_batched(mo.n, mo.mean, mo.xtx, T, m=3, rank=10)
    for k in range(2):
        single = textspan_one(mo.n, mo.mean[k], mo.xtx[k], T, m=3, rank=10)
        assert both[k].picks == single.picks and np.allclose(both[k].basis, single.basis, atol=1e-12)
    with pytest.raises(InputError, match="aligner"):
        textspan(mo, ["a", "b"], T[:, :8], pool)
    with pytest.raises(InputError, match="at least two"):
        textspan_one(1, X[0], np.outer(X[0], X[0]), T)
