"""Decode stage: image bytes or URIs → the model's preprocessed pixels, or an error reason per input."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from ..io import S3Settings, resolve
from .placement import node_id


def decode_block(t: pa.Table, transform, teacher_transform, s3: dict) -> pa.Table:
    """Bytes or URI → preprocessed float32 pixels (``_pixels``), or ``_error`` with the reason."""
    from PIL import Image, UnidentifiedImageError

    n = t.num_rows
    data = t.column("_bytes").to_pylist() if "_bytes" in t.column_names else [None] * n
    uris = t.column("uri").to_pylist()
    pixels, tpixels, errors = [], [], []
    for b, uri in zip(data, uris):
        err, px, tpx = None, None, None
        try:
            if b is None:
                if not uri:
                    raise ValueError("no image bytes and no URI")
                fs, path = resolve(uri, S3Settings(**s3))
                with fs.open_input_file(path) as f:
                    b = f.read()
            with Image.open(io.BytesIO(b)) as im:
                im.load()
                img = im.convert("RGB")
            px = np.ascontiguousarray(transform(img).numpy(), dtype=np.float32).tobytes()
            if teacher_transform is not None:
                tpx = np.ascontiguousarray(teacher_transform(img).numpy(), dtype=np.float32).tobytes()
        except FileNotFoundError as e:
            err = f"missing: {e}"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            err = f"undecodable: {type(e).__name__}: {e}"
        pixels.append(px)
        tpixels.append(tpx)
        errors.append(err)
    out = t.drop_columns([c for c in ("_bytes",) if c in t.column_names])
    out = out.append_column("_pixels", pa.array(pixels, pa.large_binary()))
    out = out.append_column("_decode_node", pa.array([node_id()] * n, pa.string()))
    if teacher_transform is not None:
        out = out.append_column("_tpixels", pa.array(tpixels, pa.large_binary()))
    return out.append_column("_error", pa.array(errors, pa.string()))


