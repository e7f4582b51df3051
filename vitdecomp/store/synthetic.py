"""Synthetic contribution stores with planted structure (benchmarks and tests; no model run).

:func:`write_synthetic_store` writes a real store (manifest, Lance or Parquet table, compact basis file)
of a ViT-like component list — ``embed``, per block ``heads`` heads and an MLP, ``bias`` — with random
contributions in which a few heads carry known *property directions*::

    st = write_synthetic_store("/tmp/s", 100_000, layout="compact", d=256, blocks=4, heads=4, head_dim=32)
    dirs = planted_directions(st)                       # [P, d] unit vectors
    st.manifest["source"]["planted"]                    # {"blocks.3.attn.head.0": 0, …}: head → property

Every head ``h`` lives in its own random ``head_dim``-dimensional subspace ``Q_h`` (the compact layout's
basis, exactly as a real compact store); a planted head's first basis vector is its property
direction and its coordinate there is ``2·a_p(x)`` with ``a(x) ~ N(0, I)`` the image's latent property
values (column ``label``: ``"pos"``/``"neg"`` by the sign of ``a_0``; column ``group`` by the sign of
``a_1``). Other coordinates are small noise with decaying scales; ``embed`` and MLPs are isotropic noise;
``bias`` is constant; the readout is the sum. Both layouts hold the same contributions (full rows are
the decoded compact ones), so a compact and a full store of the same ``seed`` give the same fit and
query results.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from ..engine.names import Component
from .compact import CompactLayout
from .manifest import Manifest, ManifestOptions, ModelInfo
from .schema import column_for, vectors_to_arrow

log = logging.getLogger(__name__)

PLANTED_PROPERTIES = 4


def synthetic_components(blocks: int, heads: int) -> list[Component]:
    """``embed``, per block ``heads`` heads (``blocks.<b>.attn.head.<h>``) and ``blocks.<b>.mlp``, ``bias``."""
    comps = [Component("embed", "embed", "")]
    for b in range(blocks):
        comps += [Component(f"blocks.{b}.attn.head.{h}", "head", f"blocks.{b}.attn", b, h) for h in range(heads)]
        comps.append(Component(f"blocks.{b}.mlp", "mlp", f"blocks.{b}.mlp", b))
    return comps + [Component("bias", "bias", "")]


def _directions(d: int, n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng([seed, 1])
    q, _ = np.linalg.qr(g.normal(size=(d, n)))
    return q.T.copy()                                                       # [n, d] orthonormal


def planted_directions(store) -> np.ndarray:
    """The property directions ``[P, d]`` (unit, orthonormal) of a synthetic store."""
    src = store.manifest.get("source") or {}
    if src.get("kind") != "synthetic":
        raise ValueError(f"{store.uri} is not a synthetic store (source kind {src.get('kind')!r})")
    return _directions(store.manifest["d"], int(src["properties"]), int(src["seed"]))


def write_synthetic_store(uri: str, rows: int, *, layout: str = "compact", d: int = 768, blocks: int = 12,
                          heads: int = 12, head_dim: int = 64, seed: int = 0, batch_rows: int = 16384,
                          dtype: str = "fp16", format: str = "lance", s3=None):
    """Write a synthetic store of ``rows`` images at ``uri`` and return it opened (:class:`Store`).

    Args:
        uri: a new local path or ``s3://`` prefix.
        rows: number of images (ids ``img-0000000`` …).
        layout: ``"compact"`` (heads as basis coordinates) or ``"full"`` (every component a ``d``-vector).
        d, blocks, heads, head_dim: the model shape (ViT-B/16: 768, 12, 12, 64).
        seed: everything (bases, directions, rows) follows from it; the same seed gives the same
            contributions in both layouts.
        batch_rows: rows generated and written per fragment (bounds memory).
        dtype: ``"fp16"`` or ``"fp32"``; format: ``"lance"`` or ``"parquet"``.

    The manifest records ``source = {"kind": "synthetic", "seed", "properties", "planted"}``.
    """
    from .store import Store, StoreError

    if layout not in ("compact", "full"):
        raise ValueError(f"layout must be 'compact' or 'full', got {layout!r}")
    if head_dim * 2 > d or min(rows, d, blocks, heads, head_dim, batch_rows) <= 0:
        raise ValueError(f"need positive sizes and head_dim ≤ d/2 (got d={d}, head_dim={head_dim}, rows={rows})")
    t0 = time.time()
    comps = synthetic_components(blocks, heads)
    head_names = [c.name for c in comps if c.kind == "head"]
    P = min(PLANTED_PROPERTIES, len(head_names), head_dim)
    dirs = _directions(d, P, seed)
    # planted heads: head p of the last block carries property p
    planted = {f"blocks.{blocks - 1}.attn.head.{p % heads}" if p < heads else head_names[-1 - p]: p for p in range(P)}
    g = np.random.default_rng([seed, 2])
    bases = {}
    for n in head_names:
        m = g.normal(size=(d, head_dim))
        if n in planted:
            m[:, 0] = dirs[planted[n]]
        q, r = np.linalg.qr(m)
        q *= np.sign(np.diag(r))[None]                                      # q[:, 0] = the direction itself
        bases[n] = q.astype(np.float32)
    lay = CompactLayout(bases, {n: 0.0 for n in head_names})
    basis_bytes = lay.to_bytes()
    bias = (g.normal(size=d) * 0.1).astype(np.float16).astype(np.float32)
    scales = (0.3 / np.sqrt(1.0 + np.arange(head_dim))).astype(np.float32)
    source = {"kind": "synthetic", "seed": seed, "properties": P, "planted": planted}
    from ..version import __version__

    fields = lay.manifest_fields(basis_bytes) if layout == "compact" else {}
    m = Manifest(format=format, model=ModelInfo(name="synthetic:vit", readout={
        "kind": "pre_logits", "pool": "token[0]", "dim": d, "space": "clip"}), preprocess={},
        options=ManifestOptions(heads=True), components=tuple(comps), d=d, dtype=dtype,
        passthrough=("label:string", "group:string"), source=source, package={"vitdecomp": __version__},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra=fields)
    st = Store.create(uri, m, s3=s3, basis=basis_bytes if layout == "compact" else None)
    if st.count():
        raise StoreError(f"{uri} already holds {st.count()} rows; write a synthetic store to a new location")
    schema = st.schema()
    Qcat = np.concatenate([bases[n].T for n in head_names], 0)             # [H·r, d]
    written = []
    for s0 in range(0, rows, batch_rows):
        n = min(batch_rows, rows - s0)
        rg = np.random.default_rng([seed, 3, s0])
        a = rg.standard_normal((n, P), dtype=np.float32)
        u = rg.standard_normal((n, len(head_names), head_dim), dtype=np.float32) * scales
        for name, p in planted.items():
            u[:, head_names.index(name), 0] = 2.0 * a[:, p]
        # every generated number is fp16-representable, so a fp32 full store holds exactly what a fp16
        # compact store does (up to the fp32 rounding of Q u)
        u = u.astype(np.float16).astype(np.float32)
        full = {c.name: (rg.standard_normal((n, d), dtype=np.float32) * 0.05).astype(np.float16).astype(np.float32)
                for c in comps if c.kind in ("embed", "mlp")}
        full["bias"] = np.broadcast_to(bias, (n, d))
        readout = u.reshape(n, -1) @ Qcat + sum(full.values())
        data = {"image_id": pa.array([f"img-{i:07d}" for i in range(s0, s0 + n)], pa.string()),
                "uri": pa.nulls(n, pa.string()),
                "label": pa.array(np.where(a[:, 0] > 0, "pos", "neg"), pa.string()),
                "group": pa.array(np.where(a[:, 1 % P] > 0, "g1", "g0"), pa.string()),
                "readout": vectors_to_arrow(readout, dtype)}
        for k, name in enumerate(head_names):
            vec = u[:, k] if layout == "compact" else u[:, k] @ bases[name].T
            data[column_for(name)] = vectors_to_arrow(vec, dtype)
        for name, vec in full.items():
            data[column_for(name)] = vectors_to_arrow(vec, dtype)
        t = pa.table(data).select(schema.names).cast(schema)
        written += st.write_uncommitted(t)
    st.commit(written, None)
    log.info("wrote a synthetic %s store of %d rows (d=%d, %d blocks × %d heads, head_dim %d) to %s in %.1f s",
             layout, rows, d, blocks, heads, head_dim, uri, time.time() - t0)
    return st
