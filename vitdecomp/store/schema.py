"""The store's Arrow schema: one row per image, one ``fixed_size_list<dtype>[d]`` column per component."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from ..engine.names import Component

DTYPES = {"fp16": pa.float16(), "fp32": pa.float32()}
RESERVED = ("image_id", "uri", "readout", "teacher")


def column_for(name: str) -> str:
    """Component name → column name (``blocks.11.attn.head.3`` → ``c_blocks_11_attn_head_3``)."""
    return "c_" + name.replace(".", "_")


def vector_type(dtype: str, d: int) -> pa.DataType:
    return pa.list_(DTYPES[dtype], d)


def contributions_schema(components: Sequence[Component], d: int, dtype: str, passthrough: pa.Schema,
                         teacher_dim: Optional[int]) -> pa.Schema:
    fields = [pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string())]
    fields += list(passthrough)
    fields.append(pa.field("readout", vector_type(dtype, d)))
    fields += [pa.field(column_for(c.name), vector_type(dtype, d)) for c in components]
    if teacher_dim:
        fields.append(pa.field("teacher", vector_type(dtype, teacher_dim)))
    return pa.schema(fields)


ERRORS_SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string()),
                           pa.field("stage", pa.string()), pa.field("reason", pa.string()),
                           pa.field("time", pa.timestamp("ms", tz="UTC"))])


def vectors_to_arrow(arr: np.ndarray, dtype: str, valid: Optional[np.ndarray] = None) -> pa.FixedSizeListArray:
    """``[n, d]`` float array → ``fixed_size_list<dtype>[d]`` (null where ``valid`` is false)."""
    n, d = arr.shape
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    values = pa.array(np.ascontiguousarray(arr, dtype=np_dtype).reshape(-1))
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)


def arrow_to_vectors(col, dtype=np.float32) -> np.ndarray:
    """``fixed_size_list[d]`` column → ``[n, d]`` numpy array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(dtype, copy=False)
