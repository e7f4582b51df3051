"""CompAttribute (SPEC §6): how much each component carries a text-described property, corpus-wide.

For a property with descriptions ``t_1..t_p`` (order matters), ``Q`` = the orthonormal basis of
their embeddings from a reduced QR in the given order. For component ``k`` and direction ``q_a``::

    s_a(x) = ⟨Σ_j c_j(x), q_a⟩,   p_ka(x) = ⟨c_k(x), q_a⟩,   score_k = mean_a Pearson_x(s_a, p_ka)

(the published code's value is (N−1)/N times this). Only the sums ``n, Σs, Σs², Σp, Σp², Σsp`` per
(k, a) are needed: they merge across Ray workers, so one pass scores any number of properties.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
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


# SPEC §6's Waterbirds word lists: known by name (``query mitigate --spurious "Waterbirds spurious"``),
# not scored by default
WATERBIRDS = {
    "Waterbirds spurious": ["water", "ocean", "lake", "sky", "land", "forest", "trees", "bamboo", "leaves"],
    "Waterbirds core": ["bird", "finch", "hummingbird", "crow", "sparrow", "swan", "albatross", "pelican"],
}


def named_properties(path: Optional[str]) -> dict[str, list[str]]:
    """Every property known by name: the defaults, SPEC §6's Waterbirds lists and the user's file."""
    props = read_properties(path)
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
    def of(cls, contributions: np.ndarray, directions: np.ndarray) -> "Sums":
        c = np.asarray(contributions, np.float64)
        proj = np.einsum("bkd,ad->bka", c, directions)          # p_ka(x)
        tot = proj.sum(1)                                        # s_a(x) (projection is linear)
        return cls(c.shape[0], tot.sum(0), (tot ** 2).sum(0), proj.sum(0), (proj ** 2).sum(0),
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


def scores(sums: Sums, sizes: Sequence[int]) -> np.ndarray:
    """``[K, P]``: mean over each property's directions (``sizes`` = directions per property)."""
    r = sums.pearson()
    out, a = [], 0
    for m in sizes:
        out.append(r[:, a:a + m].mean(1))
        a += m
    return np.stack(out, 1)


def read_properties(path: Optional[str]) -> dict[str, list[str]]:
    """A YAML/JSON mapping ``name: [descriptions…]`` (added to/overriding the defaults), or the defaults."""
    props = dict(DEFAULT_PROPERTIES)
    if path is None:
        return props
    import yaml

    with open(path) as f:
        user = yaml.safe_load(f) or {}
    if not isinstance(user, dict) or not all(isinstance(v, list) and v for v in user.values()):
        raise InputError(f"{path}: properties must map a name to a non-empty list of descriptions")
    props.update({str(k): [str(t) for t in v] for k, v in user.items()})
    return props


def compattribute(store, clip, properties: dict[str, list[str]], *, components: Optional[Sequence[str]] = None,
                  aligner=None, distributed: bool = True, cache_dir: Optional[str] = None, batch_size: int = 1024,
                  ids: Optional[Sequence[str]] = None):
    """Score every component against every property in one pass; returns (table, [K, P] scores, names).
    ``ids`` restricts the pass to those rows (e.g. a validation split; computed in this process)."""
    import pyarrow as pa

    from ..fit.text import encode_texts

    if not properties:
        raise InputError("no properties to score")
    names = list(components) if components is not None else (aligner.names if aligner is not None else store.names)
    bases = {p: basis(encode_texts(clip, d, cache_dir=cache_dir)) for p, d in properties.items()}
    dirs = np.concatenate(list(bases.values()))
    sizes = [len(b) for b in bases.values()]
    if dirs.shape[1] != (aligner.maps.shape[1] if aligner is not None else store.manifest["d"]):
        raise InputError("the property texts live in another space than the contributions: use the store's CLIP "
                         "(or its aligner's teacher) as the text model")
    if distributed and aligner is None and ids is None:
        sums = _distributed_sums(store, names, dirs, batch_size)
    else:
        sums = None
        for b in aligned_batches(store, aligner, components=names, batch_size=batch_size, dtype=np.float64,
                                    ids=ids):
            s = Sums.of(b.contributions, dirs)
            sums = s if sums is None else sums + s
    if sums is None:
        raise InputError(f"{store.uri} holds no rows")
    sc = scores(sums, sizes)
    rows = [{"component": n, "property": p, "score": float(sc[k, j])}
            for k, n in enumerate(names) for j, p in enumerate(bases)]
    return pa.Table.from_pylist(rows), sc, names


def _distributed_sums(store, names, dirs, batch_size) -> Sums:
    import io

    import pyarrow as pa

    from ..store.schema import arrow_to_vectors

    cols = store.columns_for(names)

    def block(t: pa.Table) -> pa.Table:
        x = np.stack([arrow_to_vectors(t.column(c), np.float64) for c in cols], 1)
        s = Sums.of(x, dirs)
        buf = io.BytesIO()
        np.savez(buf, n=np.array(s.n), s=s.s, s2=s.s2, p=s.p, p2=s.p2, sp=s.sp)
        return pa.table({"sums": pa.array([buf.getvalue()], pa.large_binary())})

    total = None
    for row in store.to_ray(columns=cols).map_batches(block, batch_format="pyarrow", batch_size=batch_size).iter_rows():
        z = np.load(io.BytesIO(row["sums"]))
        s = Sums(int(z["n"]), z["s"], z["s2"], z["p"], z["p2"], z["sp"])
        total = s if total is None else total + s
    return total


def heatmap(sc: np.ndarray, names: Sequence[str], props: Sequence[str], path: str, title: str = "CompAttribute") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(props), 1.5 + 0.18 * len(names)))
    lim = max(1e-6, float(np.abs(sc).max()))
    im = ax.imshow(sc, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(props)), props, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean Pearson correlation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
