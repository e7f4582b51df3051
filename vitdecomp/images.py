"""Decoding encoded image bytes into the RGB image a model's preprocessing expects.

:func:`decode_image` is the one decoder of the project: the decompose job's decode stage, heatmaps
and contact sheets all call it (through :func:`vitdecomp.io.read_image` for URIs).
"""
from __future__ import annotations

import io


def decode_image(data: bytes):
    """Encoded image bytes → an RGB ``PIL.Image`` (fully loaded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")
