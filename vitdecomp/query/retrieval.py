"""Image-based retrieval by property (README “Query”).

The property's components are ranked by how *specifically* they carry it,
``v_i − max(0, max_{j≠i} v_j)`` over the CompAttribute scores ``v`` of every known property; each
image is represented by the sum of the top components' (aligned) contributions, L2-normalised, and
images are ranked by cosine similarity to the probe images' mean representation. Exact in memory
for small corpora; for large ones (or ``index="lance"``) the representations go into a Lance
dataset with an IVF vector index (cosine) and the neighbours come from Lance's ANN search.
"""
from __future__ import annotations

import io as _io
from typing import Optional, Sequence

import numpy as np

from ..config import OptionError
from ..errors import InputError
from ..fit.compalign import aligned_batches

INDEX_NAME = "retrieval_index.lance"


def specific_rank(scores: np.ndarray, i: int) -> np.ndarray:
    """``[K]``: ``v_i − max(0, max_{j≠i} v_j)`` per component (``scores [K, P]``)."""
    v = np.asarray(scores, np.float64)
    others = np.delete(v, i, axis=1)
    rest = np.maximum(0.0, others.max(1)) if others.shape[1] else np.zeros(len(v))
    return v[:, i] - rest


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def representations(st, components: Sequence[str], aligner=None, ids=None, batch_size: int = 1024):
    """Yields ``(ids, uris, unit vectors [b, d])``: each image's normalised sum of ``components``."""
    for b in aligned_batches(st, aligner, components=list(components), ids=ids, columns=["uri"],
                             batch_size=batch_size):
        yield b.ids, b.columns["uri"].to_pylist(), _unit(b.contributions.sum(1).astype(np.float32))


def probe_vector(st, components, probe_ids: Sequence[str], aligner=None) -> np.ndarray:
    found = {}
    for ids, _, v in representations(st, components, aligner, ids=list(probe_ids)):
        found.update(zip(ids, v))
    missing = [i for i in probe_ids if i not in found]
    if missing:
        import difflib

        near = difflib.get_close_matches(missing[0], st.ids(), n=3)
        raise InputError(f"probe image ids {missing[:5]} are not in {st.uri} (close: {near}); ids are the store's "
                         "image_id column")
    return _unit(np.mean([found[i] for i in probe_ids], 0))


def exact_search(st, components, probe: np.ndarray, n: int, exclude=(), aligner=None):
    """Top ``n`` by cosine similarity, scanning the store: ``[(id, uri, score)]``."""
    best: list[tuple[float, str, str]] = []
    skip = set(exclude)
    for ids, uris, v in representations(st, components, aligner):
        s = v @ probe
        for i in np.argsort(-s)[:n + len(skip)]:
            if ids[i] not in skip:
                best.append((float(s[i]), ids[i], uris[i]))
        best = sorted(best, key=lambda t: (-t[0], t[1]))[:n]
    return [(i, u, s) for s, i, u in best]


def build_index(st, components, path: str, aligner=None, num_partitions: Optional[int] = None,
                storage_options=None):
    """Write every image's representation to a Lance dataset at ``path`` (``image_id, uri, vector``)
    and build an IVF_FLAT cosine index on ``vector``; returns the dataset."""
    import lance
    import pyarrow as pa

    def batches():
        for ids, uris, v in representations(st, components, aligner):
            d = v.shape[1]
            yield pa.record_batch({"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()),
                                   "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float32()), d)})

    first = next(batches(), None)
    if first is None:
        raise InputError(f"{st.uri} holds no rows")
    schema = first.schema
    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), path, schema=schema,
                             mode="overwrite", storage_options=storage_options)
    n = ds.count_rows()
    parts = num_partitions or max(1, min(4096, int(np.sqrt(n))))
    ds.create_index("vector", index_type="IVF_FLAT", num_partitions=parts, metric="cosine")
    return ds


def index_search(ds, probe: np.ndarray, n: int, exclude=(), nprobes: Optional[int] = None):
    """ANN search of a dataset from :func:`build_index`: ``[(id, uri, cosine similarity)]``."""
    k = n + len(set(exclude))
    q = {"column": "vector", "q": probe.astype(np.float32), "k": k}
    if nprobes:
        q["nprobes"] = int(nprobes)
    t = ds.to_table(nearest=q, columns=["image_id", "uri", "_distance"])
    out = [(i, u, 1.0 - float(dist)) for i, u, dist in zip(t.column("image_id").to_pylist(),
                                                            t.column("uri").to_pylist(),
                                                            t.column("_distance").to_pylist()) if i not in set(exclude)]
    return out[:n]


def retrieve_by_images(st, components, probe_ids, n: int, aligner=None, index: str = "auto",
                       index_threshold: int = 100_000, index_path: Optional[str] = None, nprobes: Optional[int] = None,
                       include_probes: bool = False, storage_options: Optional[dict] = None) -> tuple[list, dict]:
    """Neighbours of the probe images in the space of ``components``; returns (hits, info). A Lance
    index goes to ``index_path`` (local or ``s3://``, with Lance ``storage_options``)."""
    if index not in ("auto", "exact", "lance"):
        raise OptionError("index", f"must be auto, exact or lance, got {index!r}")
    probe = probe_vector(st, components, probe_ids, aligner)
    exclude = () if include_probes else tuple(probe_ids)
    use_index = index == "lance" or (index == "auto" and st.count() >= index_threshold)
    if not use_index:
        return exact_search(st, components, probe, n, exclude, aligner), {"search": "exact"}
    if not index_path:
        raise InputError("a Lance vector index needs a path (index_path)")
    ds = build_index(st, components, index_path, aligner, storage_options=storage_options)
    return index_search(ds, probe, n, exclude, nprobes), {"search": "lance IVF_FLAT (cosine)", "index": index_path,
                                                         "rows": ds.count_rows()}


def default_index_path(out: str) -> str:
    """Where ``query retrieve`` keeps its Lance index in the output directory ``out``."""
    from ..io import join

    return join(out, INDEX_NAME)


def retrieve_by_text(st, components: Sequence[str], text: str, clip, n: int, aligner=None,
                     cache_dir: Optional[str] = None) -> tuple[list, dict]:
    """Images ranked by ``⟨Σ_{k∈components} f_k(c_k), t⟩`` for the probe text's embedding ``t``
    (README “Query”, text-based retrieval by property); returns (hits ``[(id, uri, score)]``, info)."""
    from ..fit.text import encode_texts

    t = encode_texts(clip, [text], cache_dir=cache_dir)[0]
    ids, uris, scores = [], [], []
    for b in aligned_batches(st, aligner, components=list(components), columns=["uri"]):
        ids += b.ids
        uris += b.columns["uri"].to_pylist()
        scores.append(b.contributions.sum(1) @ t)
    scores = np.concatenate(scores) if scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")[:n]
    return [(ids[i], uris[i], float(scores[i])) for i in order], {"search": "exact", "scored": len(ids)}


def _unreadable_tile(size: int):
    """A grey tile crossed out in red: an image that could not be read or decoded."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(tile)
    w = max(2, size // 16)
    draw.line([(0, 0), (size - 1, size - 1)], fill=(220, 0, 0), width=w)
    draw.line([(0, size - 1), (size - 1, 0)], fill=(220, 0, 0), width=w)
    return tile


def contact_sheet(uris: Sequence[str], path: str, size: int = 96, cols: int = 8,
                  s3=None) -> tuple[Optional[str], list[tuple[str, str]]]:
    """A grid of the images at ``uris`` (local paths, ``s3://`` or WebDataset members
    ``shard.tar#key``, read through :func:`vitdecomp.io.read_image` with the job's S3 settings),
    written as a PNG to ``path`` (a local path or ``s3://`` URI).

    Returns ``(path, failures)``: ``path`` is None when there are no URIs; ``failures`` lists
    ``(uri, reason)`` for every image that could not be read or decoded, each drawn as a grey tile
    crossed out in red.
    """
    from PIL import Image

    from ..io import decode_errors, read_image, write_bytes

    tiles, failures = [], []
    for u in uris:
        try:
            if not u:
                raise FileNotFoundError("the store holds no source URI for this image")
            tiles.append(read_image(u, s3).resize((size, size)))
        except decode_errors() as e:
            failures.append((u, f"{type(e).__name__}: {e}"))
            tiles.append(_unreadable_tile(size))
    if not tiles:
        return None, failures
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % cols) * size, (i // cols) * size))
    buf = _io.BytesIO()
    sheet.save(buf, "PNG")
    return write_bytes(path, buf.getvalue(), s3), failures
