"""TextSpan from streamed moments (README “Fit CompAlign and TextSpan”), exactly.

For one component with contributions ``X [N, d]`` (in CLIP space) and unit text embeddings
``T [P, d]``, the greedy algorithm only needs ``n``, ``μ = mean(X)`` and ``S = XᵀX``:

1. ``V`` = top-``r`` right singular vectors of the uncentred ``X`` = top-``r`` eigenvectors of ``S``;
   every text is projected onto ``span(V)`` (``t ← VVᵀt``, not renormalised);
2. ``Σ = CᵀC`` with ``C = X − 1μᵀ`` (``Σ = S − nμμᵀ``); ``m`` times: score each text by the standard
   deviation over images of ``C·t`` — ``sqrt(tᵀΣt / (n − 1))`` — pick the best, and remove its
   direction ``u = t/‖t‖`` from the data (``Σ ← (I−uuᵀ)Σ(I−uuᵀ)``) and from every text
   (``t ← t − (t·u)u``);
3. variance explained after each pick = ``1 − tr Σ_k / tr Σ_0``; the reconstruction is
   ``R = μ + (X − μ)QQᵀ`` with ``Q`` the orthonormalised picks (the successive ``u``).

Moments are computed in one distributed pass over the store and merged (they add), so the corpus
never has to fit in memory; a CompAlign map ``A`` acts exactly on them (``μ ↦ Aμ``, ``S ↦ ASAᵀ``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..config import OptionError
from ..errors import InputError
from .arrays import ContributionSource, in_memory, is_store, to_numpy

log = logging.getLogger(__name__)


@dataclass
class Moments:
    """Mergeable first and second moments of ``K`` components: ``n``, ``sum [K, d]``, ``xtx [K, d, d]``."""

    n: int
    sum: np.ndarray
    xtx: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """From a batch ``x [b, K, d]``."""
        x = np.asarray(x, np.float64)
        xt = np.ascontiguousarray(x.transpose(1, 2, 0))                  # [K, d, b]: one batched BLAS product
        return cls(x.shape[0], x.sum(0), xt @ xt.transpose(0, 2, 1))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.sum + other.sum, self.xtx + other.xtx)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def covariance_sum(self) -> np.ndarray:
        """``CᵀC = S − n μμᵀ`` per component ``[K, d, d]``."""
        mu = self.mean
        return self.xtx - self.n * np.einsum("ki,kj->kij", mu, mu)

    def aligned(self, maps: np.ndarray) -> "Moments":
        """Moments of ``x ↦ A_k x`` for per-component maps ``maps [K, d', d]``."""
        return Moments(self.n, np.einsum("kod,kd->ko", maps, self.sum),
                       np.einsum("koi,kij,kpj->kop", maps, self.xtx, maps))

    def affine(self, maps: np.ndarray, shift: np.ndarray) -> "Moments":
        """Moments of ``x ↦ A_k x + s`` (a CompAlign map with its bias share ``s [d']``)."""
        a = self.aligned(maps)
        outer = np.einsum("ki,j->kij", a.sum, shift)
        return Moments(self.n, a.sum + self.n * shift, a.xtx + outer + outer.transpose(0, 2, 1) +
                       self.n * np.outer(shift, shift)[None])

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, n=np.array(self.n), sum=self.sum, xtx=self.xtx)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, b: bytes) -> "Moments":
        import io

        z = np.load(io.BytesIO(b))
        return cls(int(z["n"]), z["sum"], z["xtx"])


def moments_from_store(store, components: Sequence[str], *, distributed: bool = True,
                       batch_size: int = 1024) -> Moments:
    """One pass over the store: per-block moments of ``components`` (model space), merged. A compact
    store's heads are accumulated in coefficient space (README “Store layout”) and mapped once."""
    if getattr(store, "layout", "full") == "compact" or not distributed:
        return _coefficient_moments(store, components, distributed, batch_size)
    cols = store.columns_for(components)
    import pyarrow as pa

    from ..store.schema import arrow_to_vectors

    def block_moments(t: pa.Table) -> pa.Table:
        x = np.stack([arrow_to_vectors(t.column(c), np.float64) for c in cols], 1)
        return pa.table({"m": pa.array([Moments.of(x).to_bytes()], pa.large_binary())})

    ds = store.to_ray(columns=cols).map_batches(block_moments, batch_format="pyarrow", batch_size=batch_size)
    total = None
    for row in ds.iter_rows():
        m = Moments.from_bytes(row["m"])
        total = m if total is None else total + m
    if total is None:
        raise InputError(f"{store.uri} holds no rows")
    return total


def _coefficient_moments(store, components: Sequence[str], distributed: bool, batch_size: int) -> Moments:
    """:func:`moments_from_store` on a compact store (``UᵀU`` per head instead of ``XᵀX``, mapped on the
    driver), and the local pass of either layout: streamed float64 blocks (:mod:`vitdecomp.store.stream`)."""
    from ..store.compact import CoefficientMoments, table_parts

    from ..engine.names import select

    names = [store.names[i] for i in select(store.names, list(components))]
    layout = store.compact_layout
    total = CoefficientMoments(names)
    if not distributed:
        from ..store.stream import blas_threads, stream_parts

        with blas_threads():
            for b in stream_parts(store, names, dtype=np.float64):
                total.add32(b.coef, b.full, b.offset, layout)
    else:
        import pyarrow as pa

        sub = type(layout)({n: layout.bases[n] for n in names if n in layout.bases}, layout.weights)

        def block(t: pa.Table) -> pa.Table:
            coef, full, off = table_parts(t, names, sub)
            return pa.table({"m": pa.array([CoefficientMoments(names).add(coef, full, off, sub).to_bytes()],
                                           pa.large_binary())})

        ds = store.to_ray(columns=store.columns_for(names), coefficients=True)
        for row in ds.map_batches(block, batch_format="pyarrow", batch_size=batch_size).iter_rows():
            total = total + CoefficientMoments.from_bytes(row["m"])
    if total.n == 0:
        raise InputError(f"{store.uri} holds no rows")
    from ..store.stream import blas_threads

    with blas_threads():
        n, s, xtx = total.moments(layout, store.manifest["d"])
    return Moments(n, s, xtx)


@dataclass
class SpanResult:
    picks: list[int]                 # indices into the pool, in order
    variance_explained: list[float]  # cumulative, after each pick
    basis: np.ndarray                # [m, d] orthonormal picked directions (Q^T)
    mean: np.ndarray                 # [d]


def textspan_batched(n: int, means: np.ndarray, xtx: np.ndarray, texts: np.ndarray, m: int = 10,
                     rank: int = 80) -> list[SpanResult]:
    """The greedy algorithm of the module docstring for ``K`` components at once (batched over
    components: one stacked eigendecomposition, stacked scores and deflations; float64)."""
    if n < 2:
        raise InputError("TextSpan needs at least two images")
    means, xtx = np.asarray(means, np.float64), np.asarray(xtx, np.float64)
    K, d = means.shape
    r = min(rank, d)
    w, v = np.linalg.eigh(xtx)                                           # [K, d], [K, d, d] ascending
    V = v[:, :, ::-1][:, :, :r]                                          # top-r right singular vectors
    T = np.einsum("pi,kir,kjr->kpj", np.asarray(texts, np.float64), V, V)  # texts projected, per component
    cov = xtx - n * np.einsum("ki,kj->kij", means, means)
    total = np.trace(cov, axis1=1, axis2=2)
    picks = [[] for _ in range(K)]
    ve = [[] for _ in range(K)]
    basis = [[] for _ in range(K)]
    active = np.ones(K, bool)
    eye = np.eye(d)
    for _ in range(min(m, T.shape[1])):
        score = np.einsum("kpi,kij,kpj->kp", T, cov, T)
        best = score.argmax(1)
        t = T[np.arange(K), best]                                        # [K, d]
        norm = np.linalg.norm(t, axis=1)
        active &= norm >= 1e-12
        if not active.any():
            break
        u = np.where(active[:, None], t / np.maximum(norm, 1e-300)[:, None], 0.0)
        P = eye[None] - np.einsum("ki,kj->kij", u, u)
        cov = np.einsum("kij,kjl,klm->kim", P, cov, P)
        T = T - np.einsum("kp,ki->kpi", np.einsum("kpi,ki->kp", T, u), u)
        tr = np.trace(cov, axis1=1, axis2=2)
        for k in np.flatnonzero(active):
            picks[k].append(int(best[k]))
            basis[k].append(u[k])
            ve[k].append(1.0 - float(tr[k]) / float(total[k]) if total[k] > 0 else 0.0)
    return [SpanResult(picks[k], ve[k], np.array(basis[k]).reshape(len(basis[k]), d), means[k]) for k in range(K)]


def textspan_one(n: int, mean: np.ndarray, xtx: np.ndarray, texts: np.ndarray, m: int = 10,
                 rank: int = 80) -> SpanResult:
    """TextSpan for one component (see :func:`textspan_batched`)."""
    return textspan_batched(n, mean[None], xtx[None], texts, m=m, rank=rank)[0]


def textspan(moments: Union[Moments, ContributionSource], names: Optional[Sequence[str]] = None,
             texts: Optional[np.ndarray] = None, pool: Optional[Sequence[str]] = None, m: int = 10, rank: int = 80, *,
             aligner=None, distributed: bool = False, batch_size: int = 1024):
    """TextSpan for every component of ``moments``; returns (pyarrow table, {name: SpanResult}).

    Args:
        moments: the contributions, as any of
            - :class:`Moments` of ``K`` components (``names``: their ``K`` names, in order);
            - a :class:`vitdecomp.store.Store` (``names``: the components to explain; default: all, or
              the aligner's); its moments are computed in one pass (with Ray Data when ``distributed``);
            - an array ``[n, K, d]`` (numpy or torch; ``names``: the ``K`` names, in order);
            - a :class:`vitdecomp.engine.Decomposition` (``names``: the components to explain; default: all).
        texts: unit text embeddings ``[P, d]`` in the contributions' (CLIP) space, e.g. from
            :func:`vitdecomp.fit.text.encode_texts`.
        pool: the ``P`` descriptions (default: ``"text 0"``, ``"text 1"``, …).
        m: texts picked per component; ``rank``: the SVD rank ``r``.
        aligner: a CompAlign :class:`~vitdecomp.fit.compalign.Aligner` mapping a store's or array's
            contributions into its teacher's CLIP space first (not with :class:`Moments`: align those
            with :meth:`Moments.affine`).

    The table has one row per pick: component, rank, text, text_index, variance_explained, cumulative.
    """
    import pyarrow as pa

    moments, names = _moments_of(moments, names, aligner, distributed, batch_size)
    if texts is None:
        raise InputError("texts: pass the unit text embeddings [P, d] of the description pool "
                         "(vitdecomp.fit.text.encode_texts(clip, pool))")
    texts = to_numpy(texts)
    if texts.ndim != 2:
        raise InputError(f"text embeddings must be [P, d]; got shape {tuple(texts.shape)}")
    pool = [f"text {i}" for i in range(texts.shape[0])] if pool is None else list(pool)
    if texts.shape[0] != len(pool):
        raise InputError(f"text embeddings and pool differ in length ({texts.shape[0]} embeddings, {len(pool)} "
                         "descriptions)")
    if texts.shape[1] != moments.sum.shape[1]:
        raise InputError(f"text embeddings have d={texts.shape[1]} but the contributions have d={moments.sum.shape[1]}:"
                         " the pool was encoded with another model's text tower, or the contributions need a CompAlign "
                         "aligner to map them into the CLIP space")
    rows, results = [], {}
    batched = []
    for s0 in range(0, len(names), 16):                  # bounded memory: 16 components per batch
        batched += textspan_batched(moments.n, moments.mean[s0:s0 + 16], moments.xtx[s0:s0 + 16], texts, m=m,
                                    rank=rank)
    for k, name in enumerate(names):
        res = batched[k]
        results[name] = res
        prev = 0.0
        for rank_i, (p, cum) in enumerate(zip(res.picks, res.variance_explained)):
            rows.append({"component": name, "rank": rank_i, "text": pool[p], "text_index": p,
                         "variance_explained": cum - prev, "cumulative": cum})
            prev = cum
    return pa.Table.from_pylist(rows), results


def _moments_of(source, names: Optional[Sequence[str]], aligner, distributed: bool,
                batch_size: int) -> tuple[Moments, list[str]]:
    """The moments of ``source`` (Moments, Store, array ``[n, K, d]`` or Decomposition) and their names,
    mapped by ``aligner`` when given (``A_k x + b/K_aligner``, as the fit job does)."""
    if isinstance(source, Moments):
        if aligner is not None:
            raise InputError("aligner: apply it to the moments yourself (Moments.affine) or pass the store or "
                             "the contributions instead of their moments")
        K = source.sum.shape[0]
        if names is None or len(names) != K:
            raise InputError(f"moments of {K} components need their {K} names, in order; got "
                             f"{'none' if names is None else len(names)}")
        return source, list(names)
    if is_store(source):
        if aligner is not None:
            from .compalign import check_compatible

            check_compatible(aligner, source)
        names = list(names) if names is not None else list(aligner.names if aligner is not None else source.names)
        mo = moments_from_store(source, names, distributed=distributed, batch_size=batch_size)
    else:
        x, names = in_memory(source, names, what="TextSpan")
        if x.shape[0] == 0:
            raise InputError("TextSpan: the array of contributions holds no images")
        mo = Moments.of(x)
    if aligner is None:
        return mo, names
    missing = [n for n in names if n not in aligner.names]
    if missing:
        raise InputError(f"the aligner has no map for {missing[:3]} (it maps {len(aligner.names)} components, "
                         f"e.g. {aligner.names[:3]})")
    sel = [aligner.names.index(n) for n in names]
    return mo.affine(to_numpy(aligner.maps)[sel], to_numpy(aligner.bias) / len(aligner.names)), names


def report(table, title: str = "TextSpan") -> str:
    lines = [title, "=" * len(title)]
    current = None
    for r in table.to_pylist():
        if r["component"] != current:
            current = r["component"]
            lines.append(f"\n{current}")
        lines.append(f"  {r['rank'] + 1:2d}. {r['text']:<40s} +{r['variance_explained']:.3f}  (cum {r['cumulative']:.3f})")
    return "\n".join(lines) + "\n"


def reconstruction_accuracy(st, clip, spans: dict, label_column: str, class_names, aligner=None,
                            cache_dir: Optional[str] = None, batch_size: int = 1024) -> dict:
    """README “Fit CompAlign and TextSpan”'s evaluation: zero-shot accuracy with every explained component replaced by its
    TextSpan reconstruction ``μ + (x − μ)QQᵀ`` and every component of earlier blocks (and ``embed``)
    replaced by its corpus mean, next to the full model's accuracy. Two passes over the store."""
    from ..store.splits import check_column
    from .compalign import aligned_batches
    from .text import encode_texts

    check_column(st, label_column, "label_column")
    names = aligner.names if aligner is not None else st.names
    comps = {c.name: c for c in st.components}
    first = min(comps[n].block for n in spans)
    ablate = [k for k, n in enumerate(names) if comps[n].kind == "embed" or
              (comps[n].block is not None and comps[n].block < first)]
    span_idx = {names.index(n): r for n, r in spans.items()}
    labels_all = st.read(columns=[label_column]).column(label_column).to_pylist()
    classes = [str(c) for c in (class_names or sorted({str(v) for v in labels_all if v is not None}))]
    if len(classes) < 2:
        raise OptionError("label_column", f"{label_column!r} has fewer than two classes")
    T = encode_texts(clip, classes, cache_dir=cache_dir)
    sums, n = None, 0
    for b in aligned_batches(st, aligner, components=names, batch_size=batch_size, dtype=np.float64):
        s = b.contributions.sum(0)
        sums = s if sums is None else sums + s
        n += len(b.ids)
    means = sums / n
    hits = {"full": 0, "recon": 0, "ablated": 0}
    total = 0
    for b in aligned_batches(st, aligner, components=names, batch_size=batch_size, dtype=np.float64,
                             columns=[label_column]):
        y = [classes.index(str(v)) if str(v) in classes else -1 for v in b.columns[label_column].to_pylist()]
        c = b.contributions
        abl = c.copy()
        abl[:, ablate] = means[ablate]
        rec = abl.copy()
        for k, r in span_idx.items():
            Q = r.basis.T
            rec[:, k] = r.mean + (c[:, k] - r.mean) @ Q @ Q.T
        for key, arr in (("full", c), ("recon", rec), ("ablated", abl)):
            pred = (arr.sum(1) @ T.T).argmax(-1)
            hits[key] += int(sum(int(p == t) for p, t in zip(pred, y)))
        total += sum(t >= 0 for t in y)
    return {"classes": classes, "images": total, "accuracy_full": hits["full"] / total,
            "accuracy_reconstructed": hits["recon"] / total, "accuracy_mean_ablated_only": hits["ablated"] / total,
            "mean_ablated_components": [names[k] for k in ablate]}
