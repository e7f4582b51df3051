"""CompAlign recovers known orthogonal maps, is reproducible, and its artefacts round-trip safely."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitdecomp.config import AlignConfig
from vitdecomp.errors import InputError
from vitdecomp.fit.compalign import Aligner, fit, in_validation, ortho_penalty


def synthetic(seed=0, n=3000, K=3, d=6, d_t=6):
    rng = np.random.default_rng(seed)
    Q = np.stack([np.linalg.qr(rng.normal(size=(d_t, d)))[0] for _ in range(K)])   # known orthogonal maps
    c = rng.normal(size=(n, K, d)).astype(np.float32)
    z = np.einsum("kod,bkd->bo", Q, c)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    ids = [f"img{i}" for i in range(n)]
    return Q, c, z.astype(np.float32), ids


def source(c, z, ids, frac=0.1, chunk=500):
    val = np.array([in_validation(i, frac) for i in ids])

    def batches(split):
        mask = val if split == "val" else ~val
        for s in range(0, len(c), chunk):
            m = mask[s:s + chunk]
            yield c[s:s + chunk][m], z[s:s + chunk][m]
    return batches


def test_recovers_planted_orthogonal_maps_and_is_reproducible():
    Q, c, z, ids = synthetic()
    cfg = AlignConfig(lr=3e-3, max_epochs=15, batch_size=32, lam=1.0)
    a1, m1 = fit(source(c, z, ids), ["a", "b", "c"], 6, 6, cfg, progress=False)
    assert m1["best_val_cosine"] >= 0.99, m1["history"]
    # the maps are the planted ones up to one common positive scale (cosine is scale-free)
    A = a1.maps.numpy()
    scale = np.sum(A * Q) / np.sum(Q * Q)
    assert scale > 0 and np.abs(A / scale - Q).max() < 0.15
    a2, m2 = fit(source(c, z, ids), ["a", "b", "c"], 6, 6, cfg, progress=False)
    assert torch.equal(a1.maps, a2.maps) and m1["history"] == m2["history"]


def test_artefact_round_trip_without_pickle(tmp_path):
    Q, c, z, ids = synthetic(n=400)
    a, _ = fit(source(c, z, ids), ["a", "b", "c"], 6, 6, AlignConfig(max_epochs=2), progress=False)
    a.meta["model"] = {"name": "timm:x"}
    a.save(str(tmp_path / "align"))
    assert (tmp_path / "align.safetensors").exists() and (tmp_path / "align.json").exists()
    b = Aligner.load(str(tmp_path / "align.safetensors"))
    assert b.names == ["a", "b", "c"] and torch.equal(a.maps, b.maps) and b.meta["model"]["name"] == "timm:x"
    out = b.apply(c[:5])
    np.testing.assert_allclose(out.sum(1), np.einsum("kod,bkd->bo", b.maps.numpy(), c[:5]) + b.bias.numpy(),
                               atol=1e-5)


def test_orthogonality_penalty_against_hand_formula_and_split():
    maps = torch.randn(4, 5, 7, dtype=torch.float64)
    K, dt = 4, 5
    hand = sum(float(np.linalg.norm(A @ A.T - np.eye(dt), "fro")) ** 2 for A in maps.numpy()) / (K * dt)
    assert float(ortho_penalty(maps)) == pytest.approx(hand, rel=1e-12)
    q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    assert float(ortho_penalty(q[None])) < 1e-20                  # orthogonal maps cost nothing
    assert float(ortho_penalty(2 * q[None])) == pytest.approx(9.0 * 5 / 5, rel=1e-12)   # ‖4I − I‖² = 9·dt
    frac = np.mean([in_validation(f"x{i}", 0.2) for i in range(5000)])
    assert 0.17 < frac < 0.23 and in_validation("x1", 0.2) == in_validation("x1", 0.2)


def test_aligner_applies_to_store_batches(tmp_path):
    """``aligner.apply(store.iter_batches(...))`` maps each batch exactly as ``aligned_batches`` does."""
    import vitdecomp as vd
    from jobutil import synthetic_components, write_store

    comps = synthetic_components(blocks=1, heads=2)
    names = [c.name for c in comps]
    rng = np.random.default_rng(0)
    c = rng.normal(size=(10, len(comps), 8)).astype(np.float32)
    st = vd.open_store(write_store(tmp_path / "s", c, comps))
    A = torch.tensor(rng.normal(size=(len(comps), 4, 8)), dtype=torch.float32)
    al = Aligner(names, A, torch.arange(4, dtype=torch.float32), {})
    got = list(al.apply(st.iter_batches(components=names, batch_size=4)))
    ref = list(vd.fit.aligned_batches(st, al, batch_size=4))
    assert [b.ids for b in got] == [b.ids for b in ref]
    want = np.einsum("kod,bkd->bko", A.numpy(), c[[int(i[3:]) for i in got[0].ids]]) + np.arange(4) / len(names)
    np.testing.assert_allclose(got[0].contributions, want, atol=1e-5)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.contributions, r.contributions, atol=1e-6)
    with pytest.raises(InputError, match="components=aligner.names"):
        next(al.apply(st.iter_batches(components=names[:2])))
