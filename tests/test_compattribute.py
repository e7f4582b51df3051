"""CompAttribute: streamed sums equal the in-memory formula, sign-flip invariance, planted component first."""
from __future__ import annotations

import numpy as np
import pytest

from vitdecomp.query.compattribute import Sums, basis, scores


def direct(c: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """docs/method.md “CompAttribute” written directly: mean over directions of Pearson(Σ_j c_j·q_a, c_k·q_a), per component."""
    tot = c.sum(1)
    out = np.zeros(c.shape[1])
    for k in range(c.shape[1]):
        out[k] = np.mean([np.corrcoef(tot @ q, c[:, k] @ q)[0, 1] for q in Q])
    return out


def test_streamed_sums_over_partitions_equal_the_formula_and_are_sign_invariant():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(301, 5, 12))
    E = rng.normal(size=(3, 12))
    Q = basis(E)
    assert np.allclose(Q @ Q.T, np.eye(3), atol=1e-12)
    parts = [Sums.of(c[a:b], Q) for a, b in ((0, 100), (100, 101), (101, 301))]
    merged = parts[0] + parts[1] + parts[2]
    np.testing.assert_allclose(scores(merged, [3])[:, 0], direct(c, Q), atol=1e-12)
    flipped = Q * np.array([-1.0, 1.0, -1.0])[:, None]
    np.testing.assert_allclose(scores(Sums.of(c, flipped), [3]), scores(Sums.of(c, Q), [3]), atol=1e-12)


def test_planted_component_ranks_first_per_property():
    rng = np.random.default_rng(1)
    n, K, d = 500, 6, 16
    Ea, Eb = rng.normal(size=(2, d)), rng.normal(size=(2, d))
    Qa, Qb = basis(Ea), basis(Eb)
    c = 0.3 * rng.normal(size=(n, K, d))
    c[:, 2] += rng.normal(size=(n, 2)) * 3 @ Qa          # component 2 carries property a
    c[:, 4] += rng.normal(size=(n, 2)) * 3 @ Qb          # component 4 carries property b
    sc = scores(Sums.of(c, np.concatenate([Qa, Qb])), [2, 2])
    assert sc[:, 0].argmax() == 2 and sc[:, 1].argmax() == 4
    assert sc[2, 0] > 0.9 and sc[2, 0] > abs(sc[4, 0]) + 0.4 and sc[4, 1] > 0.9


# ------------------------------------------------------------------ the Python API on arrays and stores
def test_compattribute_on_arrays_by_hand():
    """A tiny case computed by hand: 4 images, 2 components in 2-d, one property along e_1."""
    import vitdecomp as vd

    c = np.array([[[1.0, 0.0], [2.0, 5.0]],
                  [[2.0, 1.0], [1.0, 0.0]],
                  [[3.0, 0.0], [5.0, 1.0]],
                  [[4.0, 2.0], [3.0, 3.0]]])                  # [n=4, K=2, d=2]
    p0, p1 = c[:, 0, 0], c[:, 1, 0]                           # projections on q = e_1 ...
    s = p0 + p1                                               # ... and of the total
    r = lambda a, b: float(np.sum((a - a.mean()) * (b - b.mean())) /  # noqa: E731
                           np.sqrt(np.sum((a - a.mean()) ** 2) * np.sum((b - b.mean()) ** 2)))
    want = np.array([[r(s, p0)], [r(s, p1)]])
    np.testing.assert_allclose(want[:, 0], [np.corrcoef(s, p0)[0, 1], np.corrcoef(s, p1)[0, 1]], atol=1e-12)
    table, sc, names = vd.query.compattribute(c, properties={"x": np.array([[3.0, 0.0]])}, names=["u", "v"])
    assert names == ["u", "v"] and sc.shape == (2, 1)
    np.testing.assert_allclose(sc, want, atol=1e-12)
    assert table.to_pylist() == [{"component": "u", "property": "x", "score": want[0, 0]},
                                 {"component": "v", "property": "x", "score": want[1, 0]}]
    # torch input, a 1-d embedding and a negated direction give the same scores
    _, sc2, _ = vd.query.compattribute(torch_tensor(c), properties={"x": np.array([-1.0, 0.0])}, names=["u", "v"])
    np.testing.assert_allclose(sc2, want, atol=1e-12)
    # two directions: the mean of the per-direction Pearsons (QR in the given order)
    q1 = np.array([[0.0, 1.0]])
    _, sc3, _ = vd.query.compattribute(c, properties={"xy": np.array([[2.0, 0.0], [1.0, 1.0]]), "y": q1},
                                       names=["u", "v"])
    ry = np.array([np.corrcoef(c[:, :, 1].sum(1), c[:, k, 1])[0, 1] for k in range(2)])
    np.testing.assert_allclose(sc3[:, 0], (want[:, 0] + ry) / 2, atol=1e-12)
    np.testing.assert_allclose(sc3[:, 1], ry, atol=1e-12)


def torch_tensor(a):
    import torch

    return torch.tensor(a, dtype=torch.float64)


def test_compattribute_array_path_equals_store_path(tmp_path):
    import vitdecomp as vd
    import vitdecomp.toyworld  # noqa: F401  (registers the toy CLIP that write_store records)
    from jobutil import synthetic_components, write_store
    from vitdecomp.errors import InputError

    rng = np.random.default_rng(3)
    comps = synthetic_components(blocks=2, heads=2)
    n, K, d = 37, len(comps), 16
    props = {"first": rng.normal(size=(3, d)), "second": rng.normal(size=(2, d))}
    c = rng.normal(size=(n, K, d)).astype(np.float32)
    c[:, 3] += (rng.normal(size=(n, 3)) * 4 @ basis(props["first"])).astype(np.float32)   # carries "first"
    st = vd.open_store(write_store(tmp_path / "s", c, comps))
    names = [x.name for x in comps]
    t_store, sc_store, n_store = vd.query.compattribute(st, None, props, distributed=False, batch_size=10)
    t_arr, sc_arr, n_arr = vd.query.compattribute(c, properties=props, names=names, batch_size=10)
    assert n_store == n_arr == names
    np.testing.assert_allclose(sc_arr, sc_store, atol=1e-10)
    assert t_arr.column("component").to_pylist() == t_store.column("component").to_pylist()
    assert sc_arr[:, 0].argmax() == 3
    # a Decomposition-like object, and a selection of components, agree too
    dec = type("Dec", (), {"names": names, "contributions": torch_tensor(c.astype(np.float64))})()
    sel = names[2:5]
    _, sc_sel_store, _ = vd.query.compattribute(st, None, props, components=sel, distributed=False)
    _, sc_sel_dec, n_sel = vd.query.compattribute(dec, properties=props, components=sel)
    assert n_sel == sel
    np.testing.assert_allclose(sc_sel_dec, sc_sel_store, atol=1e-10)
    # errors name the value and how to fix it
    with pytest.raises(InputError, match="needs names="):
        vd.query.compattribute(c, properties=props)
    with pytest.raises(InputError, match=r"3 names for an array with K=%d" % K):
        vd.query.compattribute(c, properties=props, names=names[:3])
    with pytest.raises(InputError, match=r"property 'color' is given as descriptions.*clip="):
        vd.query.compattribute(c, properties={"color": ["red color"]}, names=names)
    with pytest.raises(InputError, match="d=8 but the contributions d=16"):
        vd.query.compattribute(c, properties={"x": np.ones((1, 8))}, names=names)
    with pytest.raises(InputError, match="unknown component 'blocks.9.mlp'"):
        vd.query.compattribute(c, properties=props, names=names, components=["blocks.9.mlp"])


def test_a_subset_of_components_is_scored_against_the_total_of_all(tmp_path):
    """docs/method.md “CompAttribute”: s_a is ⟨Σ_j c_j, q_a⟩ over every component, also when only some are scored — on arrays,
    on a store (its readout) in this process and with Ray, and through an aligner (every mapped one)."""
    import vitdecomp as vd
    from jobutil import synthetic_components, write_store
    from vitdecomp.fit.compalign import Aligner

    rng = np.random.default_rng(3)
    comps = synthetic_components(blocks=2, heads=2)            # 7 components
    c = rng.normal(size=(60, len(comps), 8))
    E = rng.normal(size=(2, 8))
    Q = basis(E)
    names = [x.name for x in comps]
    pick = [names[1], names[4]]
    idx = [1, 4]
    want = direct(c, Q)[idx]                                  # the total over all seven
    assert not np.allclose(want, direct(c[:, idx], Q), atol=1e-3)   # (the subset's own total differs)
    _, sc, got = vd.query.compattribute(c, properties={"p": E}, names=names, components=pick)
    assert got == pick
    np.testing.assert_allclose(sc[:, 0], want, atol=1e-12)
    path = write_store(tmp_path / "s", c.astype(np.float32), comps)
    st = vd.open_store(path)
    c32 = c.astype(np.float32).astype(np.float64)
    want32 = direct(c32, Q)[idx]
    for distributed in (False, True):
        _, sc, _ = vd.query.compattribute(st, properties={"p": E}, components=pick, distributed=distributed)
        np.testing.assert_allclose(sc[:, 0], want32, atol=1e-5)
    import torch

    A = torch.tensor(rng.normal(size=(len(comps), 8, 8)), dtype=torch.float32)
    al = Aligner(names, A, torch.zeros(8), {})
    mapped = np.einsum("kod,nkd->nko", A.double().numpy(), c32)
    _, sc, _ = vd.query.compattribute(st, properties={"p": E}, components=pick, aligner=al, distributed=False)
    np.testing.assert_allclose(sc[:, 0], direct(mapped, Q)[idx], atol=1e-5)
