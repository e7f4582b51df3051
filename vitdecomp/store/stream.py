"""Streamed passes over a store (README “Store layout”, *At scale*): the local data passes of fit
textspan, query compattribute and query ablate read through :func:`stream_parts`.

What keeps a pass close to a raw scan of its columns (README: 1.1–21× one on a loaded 2-core machine):

- only the columns the pass needs are read (no ``image_id`` unless asked; no Python object per row);
- fp16 columns are widened into buffers that are reused from batch to batch (a vectorised copy through
  ``torch``, ≈ 8× NumPy's fp16 cast here; a fresh allocation per batch costs more in page faults than
  the conversion);
- the passes widen to float64 buffers (``dtype``; float32 is available and about 2× cheaper, but the
  passes keep float64 so that local and Ray results agree to 1e-9) and do their arithmetic as one BLAS
  product per column and batch, never on a stacked ``[b, K, d]`` copy; only ``[w, w]``/``[b, K, A]``
  results are kept and summed across batches;
- BLAS runs on one thread (:func:`blas_threads`) while Lance decodes the next batch on the others: on a
  shared 2-core machine a 2-thread OpenBLAS that competes with Lance's decoder was measured 12× slower.

The arrays a batch yields are valid until the next batch is requested (the buffers are reused): copy
what you keep.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import arrow_to_vectors, column_for

BATCH_BYTES = 64 * 1024 * 1024         # float32 bytes per streamed batch (all its columns together)
# Lance reader bounds: by default a scan reads ahead several fragments into an I/O buffer of up to 2 GiB,
# so a fast reader's resident memory grew with the store (measured: 10k → 1M rows, 281 → 810 MiB for
# a raw scan of the benchmark's full store); two fragments and 128 MiB keep it flat at no measured cost
LANCE_SCAN = {"fragment_readahead": 2, "io_buffer_size": 128 * 1024 * 1024}


def batch_rows(floats_per_row: int, budget: int = BATCH_BYTES) -> int:
    """Rows per streamed batch: ``budget`` bytes of float32 columns, between 256 and 65,536 rows
    (8,192+ rows keep the per-batch overhead small; ViT-B full rows of 158 × 768 float64 numbers get 256)."""
    return int(min(65_536, max(256, budget // max(1, 4 * floats_per_row))))


@contextlib.contextmanager
def blas_threads(n: Optional[int] = None):
    """Limit BLAS and OpenMP threads (OpenBLAS, torch's) to ``n`` (default: half the cores, at least 1)
    inside the block, so a local pass's arithmetic does not compete with the reader's decode threads
    (no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                  # pragma: no cover -- an optional speed-up
        yield
        return
    with threadpool_limits(limits=n or max(1, (os.cpu_count() or 2) // 2)):
        yield


class _Widen:
    """Reusable buffers per column: ``fixed_size_list<fp16|fp32>[w]`` → ``[n, w]`` float32 or float64 (always a
    writable copy in the column's own buffer, so a pass may work on it in place)."""

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.bufs: dict[str, np.ndarray] = {}
        try:
            import torch

            self.torch = torch
        except ImportError:              # pragma: no cover -- numpy's cast is the fallback
            self.torch = None

    def __call__(self, key: str, col) -> np.ndarray:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        n, w = len(col), col.type.list_size
        if col.null_count or n == 0:
            return arrow_to_vectors(col, self.dtype)
        flat = col.flatten()
        buf = self.bufs.get(key)
        if buf is None or buf.size < n * w:
            buf = self.bufs[key] = np.empty(n * w, self.dtype)
        out = buf[:n * w]
        if flat.type == pa.float16() and self.torch is not None:
            with warnings.catch_warnings():      # read-only Arrow memory: only read here
                warnings.simplefilter("ignore", UserWarning)
                src = self.torch.frombuffer(memoryview(flat.buffers()[1]), dtype=self.torch.float16,
                                            count=n * w, offset=flat.offset * 2)
            self.torch.from_numpy(out).copy_(src)
        else:
            np.copyto(out, flat.to_numpy(zero_copy_only=False), casting="unsafe")
        return out.reshape(n, w)


@dataclass
class PartsBatch:
    """One streamed batch: ``n`` rows; ``coef[name]`` ``u [n, r]`` of compact components, ``full[name]``
    ``[n, d]`` of the others, ``offset [n, d]`` (None unless a compact component has an offset share),
    ``readout [n, d]`` (when asked), ``columns`` (asked pass-through columns, Arrow arrays). float32,
    valid until the next batch."""

    n: int
    coef: dict
    full: dict
    offset: Optional[np.ndarray] = None
    readout: Optional[np.ndarray] = None
    columns: dict = field(default_factory=dict)
    ids: Any = None                      # Arrow array of image_id (only when asked)


def stream_parts(store, names: Sequence[str], *, readout: bool = False, columns: Sequence[str] = (),
                 ids: Optional[Sequence[str]] = None, with_ids: bool = False,
                 batch_size: Optional[int] = None, dtype=np.float32) -> Iterator[PartsBatch]:
    """The components ``names`` of ``store``'s committed rows as float32 (or ``dtype``) coefficient/vector
    blocks (:class:`PartsBatch`), reading only the needed columns; ``ids`` restricts the rows;
    ``batch_size`` defaults to :func:`batch_rows` of the row's width."""
    layout = store.compact_layout
    comp_cols = [column_for(n) for n in names]
    need_off = layout is not None and any(layout.weight(n) for n in names if n in layout.bases)
    d = int(store.manifest["d"])
    width = sum(layout.rank(n) if layout is not None and n in layout.bases else d for n in names) + \
        d * (int(need_off) + int(readout))
    batch_size = batch_size or batch_rows(width * np.dtype(dtype).itemsize // 4)
    want = list(dict.fromkeys([*comp_cols, *(["chain_offset"] if need_off else []),
                               *(["readout"] if readout else []), *columns,
                               *(["image_id"] if with_ids else [])]))
    filt = None if ids is None else pc.field("image_id").isin(pa.array(list(ids), pa.string()))
    if store.format == "lance":
        batches = store._lance("contributions").to_batches(columns=want, filter=filt, batch_size=batch_size,
                                                           **LANCE_SCAN)
    else:
        batches = store._read_raw(want, ids, "contributions").to_batches(max_chunksize=batch_size)
    widen = _Widen(dtype)
    for rb in batches:
        if rb.num_rows == 0:
            continue
        coef, full = {}, {}
        for n, c in zip(names, comp_cols):
            v = widen(c, rb.column(c))
            (coef if layout is not None and n in layout.bases else full)[n] = v
        yield PartsBatch(rb.num_rows, coef, full,
                         widen("chain_offset", rb.column("chain_offset")) if need_off else None,
                         widen("readout", rb.column("readout")) if readout else None,
                         {c: rb.column(c) for c in columns}, rb.column("image_id") if with_ids else None)


_ONES: dict = {}


def sum64(x: np.ndarray) -> np.ndarray:
    """Column sums of a float32/float64 block (``x [n, w]`` → float64 ``[w]``): one BLAS product per
    batch in the block's dtype (blocked sums: rounding grows with √n, not n), summed across batches in
    float64."""
    ones = _ONES.get(x.dtype)
    if ones is None or ones.size < x.shape[0]:
        ones = _ONES[x.dtype] = np.ones(max(x.shape[0], 65_536), x.dtype)
    return (ones[:x.shape[0]] @ x).astype(np.float64)
