"""Write stage: each block's rows become uncommitted Lance fragments or Parquet files; the driver commits."""
from __future__ import annotations

import json
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..io import S3Settings
from ..store import Store


def write_block(t: pa.Table, store_uri: str, fmt: str, schema_bytes: bytes, s3: dict,
                max_rows: Optional[int] = None) -> pa.Table:
    """Write the valid rows of one block (retried from the materialised table), report error rows.
    ``max_rows``: at most this many rows per written file (the job's ``commit_every``, so that the
    driver can fill every commit up to, and never beyond, that many images)."""
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    is_err = pc.is_valid(t.column("_error"))
    good = t.filter(pc.invert(is_err)).drop_columns(["_error"])
    bad = t.filter(is_err)
    rows = {"kind": [], "payload": [], "rows": []}
    if good.num_rows:
        good = good.select(schema.names).cast(schema)
        store = Store(store_uri, S3Settings(**s3))
        # the same uncommitted-file writer as Store.append; the driver commits the records
        step = max_rows or good.num_rows
        for start in range(0, good.num_rows, step):
            for rec in store.write_uncommitted(good.slice(start, step), format=fmt):
                rows["kind"].append("fragment" if fmt == "lance" else "file")
                rows["payload"].append(json.dumps(rec))
                rows["rows"].append(rec["rows"])
    for i, u, e in zip(bad.column("image_id").to_pylist(), bad.column("uri").to_pylist(),
                       bad.column("_error").to_pylist()):
        rows["kind"].append("error")
        rows["payload"].append(json.dumps({"image_id": i, "uri": u, "stage": "decode", "reason": e}))
        rows["rows"].append(1)
    # where the rows were decoded and decomposed (rows=0: counted in the payload, not as written rows)
    if "_model_node" in t.column_names:
        nodes = pa.table({"decode": t.column("_decode_node") if "_decode_node" in t.column_names
                          else pa.nulls(t.num_rows, pa.string()), "model": t.column("_model_node")})
        for g in nodes.group_by(["decode", "model"]).aggregate([([], "count_all")]).to_pylist():
            rows["kind"].append("placement")
            rows["payload"].append(json.dumps({"decode": g["decode"], "model": g["model"], "inputs": g["count_all"]}))
            rows["rows"].append(0)
    return pa.table({"kind": pa.array(rows["kind"], pa.string()), "payload": pa.array(rows["payload"], pa.string()),
                     "rows": pa.array(rows["rows"], pa.int64())})


