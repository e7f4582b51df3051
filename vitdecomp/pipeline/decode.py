"""Decode stage: image bytes or URIs → the model's preprocessed pixels, or an error reason per input.

Every exception raised while reading, decoding or preprocessing one input becomes that input's error
row (``_error``: one line, ``"<kind>: <ExceptionType>: <message>"``); the rest of the block goes on.
Inputs that arrive with ``_input_error`` set (a listing or table problem found by the source:
dangling symlink, unreadable entry, no URI and no bytes, ...) are passed through as error rows.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pyarrow as pa

from ..io import S3Settings, read_bytes
from .placement import node_id

log = logging.getLogger(__name__)

INPUT_ERROR = "_input_error"      # set by the sources for inputs known bad before reading
MAX_REASON = 500                  # characters kept of an error reason


def reason_for(e: BaseException) -> str:
    """A one-line reason for the error row of an input that raised ``e``."""
    from ..images import ImageError, ImageRejected

    if isinstance(e, FileNotFoundError):
        kind = "missing"
    elif isinstance(e, ImageRejected):
        kind = "rejected"
    elif isinstance(e, ImageError):
        kind = "undecodable"
    elif isinstance(e, OSError):
        kind = "unreadable"
    else:
        kind = "failed"
    msg = " ".join(str(e).split()) or "(no message)"
    out = f"{kind}: {type(e).__name__}: {msg}"
    return out if len(out) <= MAX_REASON else out[:MAX_REASON - 1] + "…"


def decode_block(t: pa.Table, transform, teacher_transform, s3: dict, max_pixels: Optional[int] = None,
                 alpha_background: str = "white") -> pa.Table:
    """Bytes or URI → preprocessed float32 pixels (``_pixels``), or ``_error`` with the reason.

    ``max_pixels``: images declaring more pixels are refused (None: Pillow's default limit);
    ``alpha_background``: colour transparent pixels are composited on (see :mod:`vitdecomp.images`).
    """
    from ..images import DEFAULT, decode_image, parse_color

    limit = DEFAULT if max_pixels is None else max_pixels
    bg = parse_color(alpha_background)
    n = t.num_rows
    data = t.column("_bytes").to_pylist() if "_bytes" in t.column_names else [None] * n
    given = t.column(INPUT_ERROR).to_pylist() if INPUT_ERROR in t.column_names else [None] * n
    uris = t.column("uri").to_pylist() if "uri" in t.column_names else [None] * n
    s3_settings = S3Settings(**s3)
    pixels, tpixels, errors = [], [], []
    for b, uri, pre in zip(data, uris, given):
        err, px, tpx = pre, None, None
        if err is None:
            try:
                if b is None:
                    if not uri:
                        raise ValueError("no image bytes and no URI")
                    b = read_bytes(uri, s3_settings)
                img = decode_image(b, max_pixels=limit, alpha_background=bg)
                px = np.ascontiguousarray(transform(img).numpy(), dtype=np.float32).tobytes()
                if teacher_transform is not None:
                    tpx = np.ascontiguousarray(teacher_transform(img).numpy(), dtype=np.float32).tobytes()
            except Exception as e:  # noqa: BLE001 — one bad input must never fail the block
                err, px, tpx = reason_for(e), None, None
                log.debug("input %r: %s", uri, err)
        pixels.append(px)
        tpixels.append(tpx)
        errors.append(err)
    out = t.drop_columns([c for c in ("_bytes", INPUT_ERROR) if c in t.column_names])
    out = out.append_column("_pixels", pa.array(pixels, pa.large_binary()))
    out = out.append_column("_decode_node", pa.array([node_id()] * n, pa.string()))
    if teacher_transform is not None:
        out = out.append_column("_tpixels", pa.array(tpixels, pa.large_binary()))
    return out.append_column("_error", pa.array(errors, pa.string()))


