"""CompAttribute (README “Query”): how much each component carries a text-described property, corpus-wide.

For a property with descriptions ``t_1..t_p`` (order matters), ``Q`` = the orthonormal basis of
their embeddings from a reduced QR in the given order. For component ``k`` and direction ``q_a``::

    s_a(x) = ⟨Σ_j c_j(x), q_a⟩,   p_ka(x) = ⟨c_k(x), q_a⟩,   score_k = mean_a Pearson_x(s_a, p_ka)

(the published code's value is (N−1)/N times this). Only the sums ``n, Σs, Σs², Σp, Σp², Σsp`` per
(k, a) are needed: they merge across Ray workers, so one pass scores any number of properties.

``score=`` (docs/method.md “CompAttribute”, “Score options”) turns the same sums into one of
:data:`SCORES`: ``"correlation"`` (the published score above, the default), ``"specific"``
(``v_i − max(0, max_{j≠i} v_j)`` over the scored properties) or ``"variance-share"``
(``mean_a Cov_x(s_a, p_ka) / Var_x(s_a)``: the component's share of the total's variance along ``q_a``;
it sums to 1 over every component).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..fit.arrays import ContributionSource, in_memory, is_store, to_numpy
from ..fit.compalign import aligned_batches

DEFAULT_PROPERTIES = {
    "color": ["blue color", "green color", "red color", "yellow color", "black color", "white color"],
    "texture": ["rough texture", "smooth texture", "furry texture", "sleek texture", "slimy texture",
                "spiky texture", "glossy texture"],
    "animal": ["camel", "elephant", "giraffe", "cat", "dog", "zebra", "cheetah"],
    "person": ["face", "head", "man", "woman", "human", "arms", "legs"],
    "location": ["sea", "beach", "forest", "desert", "city", "sky", "marsh"],
    "pattern": ["spotted pattern", "striped pattern", "polka dot pattern", "plain pattern", "checkered pattern"],
    "shape": ["triangular shape", "rectangular shape", "circular shape", "octagon"],
}


# README “Query”'s Waterbirds word lists: known by name (``query mitigate --spurious "Waterbirds spurious"``),
# not scored by default
WATERBIRDS = {
    "Waterbirds spurious": ["water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves"],
    "Waterbirds core": ["bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican"],
}


def named_properties(path: Optional[str], s3=None) -> dict[str, list[str]]:
    """Every property known by name: the defaults, README “Query”'s Waterbirds lists and the user's file."""
    props = read_properties(path, s3)
    return {**props, **{k: v for k, v in WATERBIRDS.items() if k not in props}}


def basis(embeddings: np.ndarray) -> np.ndarray:
    """Rows: orthonormal basis of the description embeddings ``[p, d]`` (reduced QR, given order)."""
    q, r = np.linalg.qr(np.asarray(embeddings, np.float64).T)
    keep = np.abs(np.diag(r)) > 1e-10 * max(1.0, np.abs(r).max())
    return q[:, keep].T


@dataclass
class Sums:
    """Mergeable sums over images for directions ``A`` (all properties' bases stacked) and components ``K``."""

    n: int
    s: np.ndarray      # [A]
    s2: np.ndarray     # [A]
    p: np.ndarray      # [K, A]
    p2: np.ndarray     # [K, A]
    sp: np.ndarray     # [K, A]

    @classmethod
    def of(cls, contributions: np.ndarray, directions: np.ndarray, total: Optional[np.ndarray] = None) -> "Sums":
        """``contributions [b, K, d]`` of the scored components; ``total [b, d]``: the sum over *every*
        component (README “Query”'s ``Σ_j c_j``) when only some are scored (default: their sum)."""
        c = np.asarray(contributions, np.float64)
        proj = np.einsum("bkd,ad->bka", c, directions)          # p_ka(x)
        tot = proj.sum(1) if total is None else np.asarray(total, np.float64) @ directions.T   # s_a(x)
        return cls(c.shape[0], tot.sum(0), (tot ** 2).sum(0), proj.sum(0), (proj ** 2).sum(0),
                   np.einsum("ba,bka->ka", tot, proj))

    @classmethod
    def of_projections(cls, proj: np.ndarray, total: Optional[np.ndarray] = None) -> "Sums":
        """From ``proj [b, K, A]`` = ``p_ka`` and ``total [b, A]`` = ``s_a`` (default: ``Σ_k p_ka``)."""
        tot = proj.sum(1) if total is None else total
        return cls(proj.shape[0], tot.sum(0), (tot ** 2).sum(0), proj.sum(0), (proj ** 2).sum(0),
                   np.einsum("ba,bka->ka", tot, proj))

    def __add__(self, o: "Sums") -> "Sums":
        return Sums(self.n + o.n, self.s + o.s, self.s2 + o.s2, self.p + o.p, self.p2 + o.p2, self.sp + o.sp)

    def pearson(self) -> np.ndarray:
        """``[K, A]`` Pearson correlation of ``p_ka`` with ``s_a`` over the images."""
        n = self.n
        cov = self.sp - self.s[None] * self.p / n
        vs = self.s2 - self.s ** 2 / n
        vp = self.p2 - self.p ** 2 / n
        den = np.sqrt(np.clip(vs[None] * vp, 0, None))
        return np.where(den > 0, cov / np.where(den > 0, den, 1), 0.0)

    def variance_share(self) -> np.ndarray:
        """``[K, A]`` ``Cov(s_a, p_ka) / Var(s_a)`` over the images (0 where ``Var(s_a)`` is 0)."""
        n = self.n
        cov = self.sp - self.s[None] * self.p / n
        vs = np.broadcast_to(self.s2 - self.s ** 2 / n, cov.shape)
        return np.where(vs > 0, cov / np.where(vs > 0, vs, 1), 0.0)


SCORES = ("correlation", "specific", "variance-share")


def scores(sums: Sums, sizes: Sequence[int], score: str = "correlation") -> np.ndarray:
    """``[K, P]``: mean over each property's directions (``sizes`` = directions per property) of the
    Pearson correlation (``score="correlation"``, the published score, and ``"specific"``, which then
    subtracts ``max(0, max_{j≠i} v_j)`` over the other properties) or of the variance share
    (``"variance-share"``)."""
    if score not in SCORES:
        raise InputError(f"unknown CompAttribute score {score!r}; choose one of {', '.join(SCORES)}")
    r = sums.variance_share() if score == "variance-share" else sums.pearson()
    out, a = [], 0
    for m in sizes:
        out.append(r[:, a:a + m].mean(1))
        a += m
    v = np.stack(out, 1)
    if score == "specific":
        rest = [np.maximum(0.0, np.delete(v, i, axis=1).max(1)) if v.shape[1] > 1 else np.zeros(len(v))
                for i in range(v.shape[1])]
        v = v - np.stack(rest, 1)
    return v


def read_properties(path: Optional[str], s3=None) -> dict[str, list[str]]:
    """A YAML/JSON mapping ``name: [descriptions…]`` (added to/overriding the defaults), or the defaults.
    ``path`` is a local file or ``s3://`` (read with the job's S3 settings ``s3``)."""
    props = dict(DEFAULT_PROPERTIES)
    if path is None:
        return props
    import yaml

    from ..io import read_bytes

    user = yaml.safe_load(read_bytes(path, s3).decode("utf-8")) or {}
    if not isinstance(user, dict) or not all(isinstance(v, list) and v for v in user.values()):
        raise InputError(f"{path}: properties must map a name to a non-empty list of descriptions")
    props.update({str(k): [str(t) for t in v] for k, v in user.items()})
    return props


def compattribute(store: ContributionSource, clip=None,
                  properties: Optional[Mapping[str, Union[Sequence[str], np.ndarray]]] = None, *,
                  components: Optional[Sequence[str]] = None, aligner=None, distributed: bool = True,
                  cache_dir: Optional[str] = None, batch_size: int = 1024, ids: Optional[Sequence[str]] = None,
                  names: Optional[Sequence[str]] = None, score: str = "correlation"):
    """Score every component against every property in one pass; returns (table, [K, P] scores, names).

    Args:
        store: the contributions: a :class:`vitdecomp.store.Store`, an array ``[n, K, d]`` (numpy or
            torch) with ``names=`` (its ``K`` component names, in order), or a
            :class:`vitdecomp.engine.Decomposition`.
        clip: the open_clip model (:class:`vitdecomp.models.LoadedModel`) whose text tower encodes
            properties given as descriptions; not needed when every property is given as embeddings.
        properties: ``{name: [descriptions…]}`` or ``{name: embeddings [p, d]}`` (the QR order is the
            given order); default: :data:`DEFAULT_PROPERTIES`.
        components: the components to score (default: all, or the aligner's); ``s_a`` is always the
            total over every component (the readout; with an aligner, the sum of every mapped component).
        aligner: a CompAlign aligner mapping the contributions into its teacher's CLIP space first.
        distributed: a store's sums with Ray Data (without an aligner or ``ids``); else in this process.
        ids: a store's rows to use (e.g. a validation split).
        score: one of :data:`SCORES` — ``"correlation"`` (default; the published score), ``"specific"``
            (minus the largest positive score of another property) or ``"variance-share"``.

    The table has one row per (component, property): component, property, score.
    """
    import pyarrow as pa

    properties = DEFAULT_PROPERTIES if properties is None else properties
    if not properties:
        raise InputError("no properties to score")
    if score not in SCORES:
        raise InputError(f"unknown CompAttribute score {score!r}; choose one of {', '.join(SCORES)}")
    from_store = is_store(store)
    if from_store:
        if names is not None:
            raise InputError("names= labels an array's components; to choose a store's components pass components=")
        all_names = list(aligner.names if aligner is not None else store.names)
        x = None
    else:
        if ids is not None:
            raise InputError("ids= selects a store's rows; index the array of contributions instead")
        x, all_names = in_memory(store, names, what="CompAttribute")
        if aligner is not None:
            missing = [n for n in all_names if n not in aligner.names]
            if missing:
                raise InputError(f"the aligner has no map for {missing[:3]} (it maps {len(aligner.names)} "
                                 f"components, e.g. {aligner.names[:3]})")
            x = aligner.subset(all_names).apply(x).astype(np.float64)
    x_total, idx = None, None
    if components is not None:
        from ..engine.names import select

        idx = select(all_names, list(components))
        names = [all_names[i] for i in idx]
        if x is not None and len(names) < len(all_names):
            x_total = x.sum(1)                                    # s_a: the total over every component
        if x is not None:
            x = x[:, idx]
    else:
        names = all_names
    subset = len(names) < len(all_names)
    bases = {str(p): basis(_property_embeddings(p, d, clip, cache_dir)) for p, d in properties.items()}
    dirs = np.concatenate(list(bases.values()))
    sizes = [len(b) for b in bases.values()]
    d_contrib = x.shape[2] if x is not None else (aligner.maps.shape[1] if aligner is not None else store.manifest["d"])
    if dirs.shape[1] != d_contrib:
        raise InputError(f"the property embeddings have d={dirs.shape[1]} but the contributions d={d_contrib}: they "
                         "live in another space — use the contributions' CLIP (or its aligner's teacher) as the "
                         "text model")
    sums = None
    if x is not None:
        for s0 in range(0, x.shape[0], batch_size):
            s = Sums.of(x[s0:s0 + batch_size], dirs, None if x_total is None else x_total[s0:s0 + batch_size])
            sums = s if sums is None else sums + s
        if sums is None:
            raise InputError("CompAttribute: the array of contributions holds no images")
    elif distributed and aligner is None and ids is None:
        sums = _distributed_sums(store, names, dirs, batch_size, with_readout=subset)
    elif aligner is not None and subset:                           # the total needs every mapped component
        for b in aligned_batches(store, aligner, components=all_names, batch_size=batch_size, dtype=np.float64,
                                 ids=ids):
            s = Sums.of(b.contributions[:, idx], dirs, b.contributions.sum(1))
            sums = s if sums is None else sums + s
    elif aligner is None:             # either layout, in coefficient space: streamed float64 blocks
        from ..store.compact import CoefficientMap
        from ..store.stream import blas_threads, stream_parts

        cmap = CoefficientMap(store.compact_layout, names, dirs)
        with blas_threads():
            for b in stream_parts(store, names, readout=subset, ids=ids, dtype=np.float64):
                s = Sums.of_projections(cmap(b.coef, b.full, b.offset), b.readout @ dirs.T if subset else None)
                sums = s if sums is None else sums + s
    else:
        for b in aligned_batches(store, aligner, components=names, batch_size=batch_size, dtype=np.float64,
                                 ids=ids):
            s = Sums.of(b.contributions, dirs, b.readout if subset else None)
            sums = s if sums is None else sums + s
    if sums is None:
        raise InputError(f"{store.uri} holds no rows")
    sc = scores(sums, sizes, score)
    rows = [{"component": n, "property": p, "score": float(sc[k, j])}
            for k, n in enumerate(names) for j, p in enumerate(bases)]
    return pa.Table.from_pylist(rows), sc, names


def _property_embeddings(name, value, clip, cache_dir: Optional[str]) -> np.ndarray:
    """A property's description embeddings ``[p, d]``: given, or its descriptions encoded by ``clip``."""
    if isinstance(value, str):
        raise InputError(f"property {name!r}: expected a list of descriptions or embeddings [p, d], got the "
                         f"string {value!r} (wrap it in a list)")
    if not hasattr(value, "shape") and len(value) and not isinstance(value[0], str):
        value = np.asarray(value, dtype=np.float64)                # nested lists of numbers: embeddings
    if hasattr(value, "shape"):                                    # numpy array or torch tensor
        e = to_numpy(value)
        e = e[None] if e.ndim == 1 else e
        if e.ndim != 2 or e.shape[0] == 0:
            raise InputError(f"property {name!r}: embeddings must be [p, d] with p ≥ 1; got shape {tuple(e.shape)}")
        if not np.isfinite(e).all():
            raise InputError(f"property {name!r}: the embeddings hold NaN or infinite values")
        return e
    texts = [str(t) for t in value]
    if not texts:
        raise InputError(f"property {name!r} has no descriptions")
    if clip is None:
        raise InputError(f"property {name!r} is given as descriptions {texts[:3]}: pass the text model (clip=) "
                         "or the descriptions' embeddings [p, d]")
    from ..fit.text import encode_texts

    return encode_texts(clip, texts, cache_dir=cache_dir)


def _distributed_sums(store, names, dirs, batch_size, with_readout: bool = False) -> Sums:
    import io

    import pyarrow as pa

    from ..store.schema import arrow_to_vectors

    cols = store.columns_for(names)
    compact = getattr(store, "layout", "full") == "compact"
    if compact:                       # README “Store layout”: projections from the stored coordinates
        from ..store.compact import CoefficientMap, table_parts

        layout = store.compact_layout
        cmap = CoefficientMap(type(layout)({n: layout.bases[n] for n in names if n in layout.bases},
                                           layout.weights), names, dirs)

    def block(t: pa.Table) -> pa.Table:
        tot = arrow_to_vectors(t.column("readout"), np.float64) if with_readout else None
        if compact:
            s = Sums.of_projections(cmap(*table_parts(t, names, cmap.layout)), None if tot is None else tot @ dirs.T)
        else:
            x = np.stack([arrow_to_vectors(t.column(c), np.float64) for c in cols], 1)
            s = Sums.of(x, dirs, tot)
        buf = io.BytesIO()
        np.savez(buf, n=np.array(s.n), s=s.s, s2=s.s2, p=s.p, p2=s.p2, sp=s.sp)
        return pa.table({"sums": pa.array([buf.getvalue()], pa.large_binary())})

    total = None
    for row in store.to_ray(columns=cols + (["readout"] if with_readout else []), coefficients=compact).map_batches(block, batch_format="pyarrow", batch_size=batch_size).iter_rows():
        z = np.load(io.BytesIO(row["sums"]))
        s = Sums(int(z["n"]), z["s"], z["s2"], z["p"], z["p2"], z["sp"])
        total = s if total is None else total + s
    return total


def heatmap(sc: np.ndarray, names: Sequence[str], props: Sequence[str], title: str = "CompAttribute",
            label: str = "mean Pearson correlation"):
    """The ``[K, P]`` scores as a matplotlib figure (components × properties); the job saves it
    through its output directory (:meth:`vitdecomp.io.OutputDir.savefig`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(props), 1.5 + 0.18 * len(names)))
    lim = max(1e-6, float(np.abs(sc).max()))
    im = ax.imshow(sc, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(props)), props, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig
