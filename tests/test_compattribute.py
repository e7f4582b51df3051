"""CompAttribute: streamed sums equal the in-memory formula, sign-flip invariance, planted component first."""
from __future__ import annotations

import numpy as np

from vitdecomp.query.compattribute import Sums, basis, scores


def direct(c: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """SPEC §6 written directly: mean over directions of Pearson(Σ_j c_j·q_a, c_k·q_a), per component."""
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
