"""The store's Arrow schema: one row per image, one ``fixed_size_list<dtype>[d]`` column per component."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..engine.names import Component

DTYPES = {"fp16": pa.float16(), "fp32": pa.float32()}
RESERVED = ("image_id", "uri", "readout", "teacher", "chain_offset")


def column_for(name: str) -> str:
    """Component name → column name (``blocks.11.attn.head.3`` → ``c_blocks_11_attn_head_3``)."""
    return "c_" + name.replace(".", "_")


def vector_type(dtype: str, d: int) -> pa.DataType:
    return pa.list_(DTYPES[dtype], d)


def contributions_schema(components: Sequence[Component], d: int, dtype: str, passthrough: pa.Schema,
                         teacher_dim: Optional[int], widths: Optional[Mapping[str, int]] = None,
                         offset: bool = False) -> pa.Schema:
    """``widths``: component name → stored vector size (compact layout: the basis rank; default ``d``);
    ``offset``: add the ``chain_offset [d]`` column (compact components with an offset share)."""
    widths = widths or {}
    fields = [pa.field("image_id", pa.string(), nullable=False), pa.field("uri", pa.string())]
    fields += list(passthrough)
    fields.append(pa.field("readout", vector_type(dtype, d)))
    fields += [pa.field(column_for(c.name), vector_type(dtype, widths.get(c.name, d))) for c in components]
    if offset:
        fields.append(pa.field("chain_offset", vector_type(dtype, d)))
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


def schema_dtype(schema: pa.Schema) -> str:
    """``"fp16"``/``"fp32"``: the element type of a contributions schema's vector columns."""
    value_type = schema.field("readout").type.value_type
    return next(k for k, v in DTYPES.items() if v == value_type)


def passthrough_names(schema: pa.Schema) -> list[str]:
    """The pass-through columns of a contributions schema (neither reserved nor ``c_*``)."""
    return [n for n in schema.names if n not in RESERVED and not n.startswith("c_")]


def rows_table(schema: pa.Schema, names: Sequence[str], ids: Sequence[str], uris: Optional[Sequence[Optional[str]]],
               columns: Optional[dict], readout: np.ndarray, contributions: Optional[np.ndarray],
               teacher: Optional[np.ndarray] = None, valid: Optional[np.ndarray] = None, *,
               codec=None, offset: Optional[np.ndarray] = None) -> pa.Table:
    """One chunk of store rows as an Arrow table of exactly ``schema`` (shared by the decompose
    workers and :meth:`vitdecomp.store.Store.append`).

    Args:
        schema: the store's contributions schema.
        names: component names, ordered as ``contributions``' ``K`` axis (each must have a column).
        ids: ``n`` image ids; ``uris``: ``n`` URIs (None: null).
        columns: pass-through column name → ``n`` values (Arrow array or list); exactly the schema's.
        readout: ``[n, d]`` float; ``contributions``: ``[n, K, d]`` float (None when ``K == 0``);
            ``teacher``: ``[n, d_t]`` float (required iff the schema has a teacher column).
        valid: ``[n]`` bool; vectors of rows where it is false are null (rows that failed).
        codec: the store's :class:`~vitdecomp.store.compact.CompactLayout` (compact stores): its
            components are stored as basis coordinates; ``offset [n, d]`` is the chain offset
            (``Decomposition.offset``; required when the schema has a ``chain_offset`` column).

    Raises:
        InputError: shapes, names or columns that do not fit the schema.
    """
    from ..errors import InputError

    n = len(ids)
    dtype = schema_dtype(schema)
    d = schema.field("readout").type.list_size
    readout = np.asarray(readout)
    if readout.shape != (n, d):
        raise InputError(f"readout has shape {list(readout.shape)}; the store needs [{n}, {d}] ({n} ids, d={d})")
    K = len(names)
    if K:
        contributions = np.asarray(contributions)
        if contributions.shape != (n, K, d):
            raise InputError(f"contributions have shape {list(contributions.shape)}; the store needs "
                             f"[{n}, {K}, {d}] ({n} ids, {K} components, d={d})")
    have = [c for c in schema.names if c.startswith("c_")]
    if [column_for(c) for c in names] != have:
        extra = [c for c in names if column_for(c) not in have]
        raise InputError(f"the components {list(names)[:3]}… ({K}) are not the store's ({len(have)} columns); "
                         f"not in the store: {extra[:5]}")
    want = passthrough_names(schema)
    columns = dict(columns or {})
    if sorted(columns) != sorted(want):
        raise InputError(f"pass-through columns {sorted(columns)} given; the store's are {want}")
    has_teacher = "teacher" in schema.names
    if has_teacher != (teacher is not None):
        raise InputError("the store has a teacher column: pass the teacher embeddings" if has_teacher else
                         "the store has no teacher column, but teacher embeddings were given")
    data: dict = {"image_id": pa.array(list(ids), pa.string()),
                  "uri": pa.array(list(uris) if uris is not None else [None] * n, pa.string())}
    for name in want:
        values = columns[name]
        if len(values) != n:
            raise InputError(f"pass-through column {name!r} has {len(values)} values for {n} ids")
        data[name] = values
    data["readout"] = vectors_to_arrow(readout, dtype, valid)
    encoded = codec.encode(names, contributions, offset) if codec is not None and K else {}
    for k, name in enumerate(names):
        vec = encoded[name] if name in encoded else contributions[:, k]
        want_w = schema.field(column_for(name)).type.list_size
        if vec.shape[1] != want_w:
            raise InputError(f"component {name}: {vec.shape[1]} numbers per image, the store's column holds "
                             f"{want_w} (a compact store is written with its basis: Store.append does this)")
        data[column_for(name)] = vectors_to_arrow(vec, dtype, valid)
    if "chain_offset" in schema.names:
        if offset is None:
            raise InputError("the store keeps the readout chain's offset (compact layout, uniform convention): "
                             "pass the decomposition's offset [n, d]")
        data["chain_offset"] = vectors_to_arrow(np.asarray(offset, np.float32), dtype, valid)
    if has_teacher:
        teacher = np.asarray(teacher)
        d_t = schema.field("teacher").type.list_size
        if teacher.shape != (n, d_t):
            raise InputError(f"teacher embeddings have shape {list(teacher.shape)}; the store needs [{n}, {d_t}]")
        data["teacher"] = vectors_to_arrow(teacher, dtype, valid)
    return pa.table(data).select(schema.names).cast(schema)
