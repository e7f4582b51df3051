"""Decoding encoded image bytes into the RGB image a model's preprocessing expects.

:func:`decode_image` is the one decoder of the project: the decompose job's decode stage, heatmaps
and contact sheets all call it (through :func:`vitdecomp.io.read_image` for URIs). Its rules:

- **Size limit first.** The size the file's header declares is checked *before* any pixel is
  decoded: an image of more than ``max_pixels`` pixels raises :class:`ImageRejected` ("image is
  30000x30000 = 900 Mpx, over the limit of 89.5 Mpx ..."). The default limit is Pillow's
  ``Image.MAX_IMAGE_PIXELS`` (read at each call); ``max_pixels=None`` means no limit. Pillow's own
  ``DecompressionBombError``/``Warning`` never decides: Pillow's global limit is switched off only
  while the header is read (a few microseconds, under a module lock, then restored), and while
  pixels are decoded it is, under the same lock, set to this call's limit when that is higher
  than Pillow's. A frame or tile that declares more than twice the limit while decoding is
  refused with :class:`ImageRejected` too.
- **First frame.** Animated GIF/WebP/APNG and multi-page TIFF files decode to their first frame.
- **EXIF orientation** is applied (``ImageOps.exif_transpose``); a malformed EXIF block is ignored.
- **16- and 32-bit greyscale** (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``, ``F``) is scaled to
  8 bits by the image's real range: ``v8 = floor((v - min) / (max - min) * 255 + 0.5)`` over the
  finite values, so a dark 16-bit scan becomes a full-range 8-bit one and nothing saturates.
  NaN becomes 0, +inf 255, -inf 0. A constant image (``max == min``) maps to its value placed in
  the mode's nominal range and clipped to it: ``[0, 65535]`` for the ``I;16`` modes and ``I``,
  ``[0.0, 1.0]`` for ``F`` (so a constant 16-bit 32768 becomes 128, a constant ``F`` 0.5 becomes 128).
- **Transparency** (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a palette or grey/RGB colour key
  with a ``transparency`` entry) is composited on ``alpha_background`` (white by default):
  ``out = floor((c * a + bg * (255 - a)) / 255 + 0.5)`` per channel, ``a`` the 8-bit alpha.
- **Everything else** (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, 48-bit RGB, ...)
  is converted to RGB by Pillow's own ``convert("RGB")``.
- **Errors** are :class:`ImageError` (a :class:`vitdecomp.errors.InputError`) whose message says
  what is wrong in words: "empty file (0 bytes)", "not a supported image format (...)",
  "corrupt or truncated PNG data: ...". They never show object reprs.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
from typing import Iterator, Optional, Union

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT", "ImageError", "ImageRejected", "decode_image", "parse_color"]


class _Default:
    """Sentinel type of :data:`DEFAULT` (Pillow's ``Image.MAX_IMAGE_PIXELS`` at call time)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
"""``max_pixels=DEFAULT``: Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89.5 Mpx), read at each call."""

Color = Union[str, tuple]

# modes whose samples have more than 8 bits, with their nominal range (used for constant images)
_WIDE_MODES = {"I;16": (0.0, 65535.0), "I;16B": (0.0, 65535.0), "I;16L": (0.0, 65535.0),
               "I;16N": (0.0, 65535.0), "I": (0.0, 65535.0), "F": (0.0, 1.0)}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LIMIT_LOCK = threading.RLock()
_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


class ImageError(InputError):
    """Encoded bytes that cannot be decoded into an image (the message says why, in words)."""


class ImageRejected(ImageError):
    """An image refused by a rule before decoding (e.g. more pixels than ``max_pixels``)."""


def _clean(msg: str) -> str:
    """One line, no object reprs (``<_io.BytesIO object at 0x...>`` → ``the data``)."""
    return " ".join(_REPR.sub("the data", str(msg)).split())


def _px(pixels: int) -> str:
    """``900000000`` → ``"900 Mpx"``, ``89478485`` → ``"89.5 Mpx"``, ``5000`` → ``"5000 px"``."""
    if pixels < 1_000_000:
        return f"{pixels} px"
    s = f"{pixels / 1e6:.1f}"
    return (s[:-2] if s.endswith(".0") else s) + " Mpx"


def parse_color(value: Color) -> tuple[int, int, int]:
    """A colour name (``"white"``), ``"#rrggbb"`` or an ``(r, g, b)`` tuple of 0..255 → ``(r, g, b)``."""
    from PIL import ImageColor

    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value.strip())
        except ValueError:
            raise InputError(f"unknown colour {value!r}: use a colour name such as 'white' or '#rrggbb'") from None
        return tuple(int(c) for c in rgb[:3])
    try:
        rgb = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        raise InputError(f"a colour must be a name, '#rrggbb' or (r, g, b), got {value!r}") from None
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise InputError(f"a colour tuple must be three values 0..255, got {value!r}")
    return rgb


@contextlib.contextmanager
def _pillow_limit(value: Optional[int]) -> Iterator[None]:
    """Pillow's global ``MAX_IMAGE_PIXELS`` set to ``value`` for the block (under a lock), then restored."""
    from PIL import Image

    with _LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = value
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _limit(max_pixels) -> Optional[int]:
    from PIL import Image

    if max_pixels is DEFAULT:
        return Image.MAX_IMAGE_PIXELS
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InputError(f"max_pixels must be a positive whole number or None (no limit), got {max_pixels!r}")
    return int(max_pixels)


def decode_image(data: bytes, *, max_pixels: Union[int, None, _Default] = DEFAULT,
                 alpha_background: Color = (255, 255, 255)):
    """Encoded image bytes → a fully loaded RGB ``PIL.Image`` (rules in the module docstring).

    ``max_pixels``: refuse images declaring more pixels (``DEFAULT``: Pillow's ``MAX_IMAGE_PIXELS``;
    ``None``: no limit). ``alpha_background``: the colour transparent pixels are composited on
    (a name, ``"#rrggbb"`` or ``(r, g, b)``). Raises :class:`ImageRejected` for an image over the
    limit and :class:`ImageError` for anything that cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    limit = _limit(max_pixels)
    bg = parse_color(alpha_background)
    if data is None:
        raise ImageError("no image data")
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with _pillow_limit(None):          # our own check below decides, from the header alone
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt:
            raise ImageError(f"corrupt or truncated {fmt} data: the header cannot be read "
                             f"({len(data)} bytes)") from None
        raise ImageError(f"not a supported image format ({len(data)} bytes starting {bytes(data[:8])!r})") from None
    except OSError as e:
        raise ImageError(f"corrupt or truncated {_sniff(data) or 'image'} data: the header cannot be read "
                         f"({_clean(e)})") from e
    except Exception as e:  # noqa: BLE001 — a header Pillow cannot parse is a bad input, whatever the error
        raise ImageError(f"unreadable {_sniff(data) or 'image'} header: {type(e).__name__}: {_clean(e)}") from e
    fmt = im.format or "image"
    with im:
        w, h = im.size
        if limit is not None and w * h > limit:
            raise ImageRejected(f"{fmt} image is {w}x{h} = {_px(w * h)}, over the limit of {_px(limit)}"
                                + (f" ({limit} pixels)" if limit >= 1_000_000 else "")
                                + " (raise max_pixels to accept it)")
        try:
            pillow = Image.MAX_IMAGE_PIXELS
            raise_pillow = limit is None or (pillow is not None and limit > pillow)
            with (_pillow_limit(limit) if raise_pillow else contextlib.nullcontext()):
                im.load()                  # the first frame of animations and multi-page files
            out = _to_rgb(_orient(im), bg)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected(f"{fmt} image {w}x{h}: a frame or tile declares more pixels than allowed "
                                f"({_clean(e)}); raise max_pixels to accept it") from None
        except OSError as e:
            raise ImageError(f"corrupt or truncated {fmt} data: {_clean(e)}") from e
        except Exception as e:  # noqa: BLE001 — decoders raise many types on hostile data
            raise ImageError(f"cannot decode {fmt} data: {type(e).__name__}: {_clean(e)}") from e
    return out


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _sniff(data: bytes) -> Optional[str]:
    """The format whose signature ``data`` starts with (for files too damaged for Pillow to identify)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _orient(im):
    """Apply the EXIF orientation tag (a malformed EXIF block is ignored)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001
        log.debug("EXIF orientation ignored (%s: %s)", type(e).__name__, _clean(e))
        return im


def _to_rgb(im, bg: tuple[int, int, int]):
    """A loaded image of any mode → RGB (module docstring rules)."""
    from PIL import Image

    mode = im.mode
    if mode in _WIDE_MODES:
        raw = np.asarray(im)
        grey = Image.fromarray(_scale_to_8bit(raw, mode), "L")
        key = im.info.get("transparency")
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            alpha = np.where(raw == key, 0, 255).astype(np.uint8)
            return _composite(np.repeat(np.asarray(grey)[..., None], 3, axis=2), alpha, bg)
        return grey.convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        if mode == "La":
            im = im.convert("LA")
        rgba = np.asarray(im.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3], bg)
    return im.convert("RGB")


def _scale_to_8bit(raw: np.ndarray, mode: str) -> np.ndarray:
    """Wide samples → uint8 by the image's finite min..max (constant images: the nominal range)."""
    v = raw.astype(np.float64)
    finite = np.isfinite(v)
    out = np.zeros(v.shape, np.float64)
    if finite.any():
        lo, hi = float(v[finite].min()), float(v[finite].max())
        if hi > lo:
            out[finite] = (v[finite] - lo) / (hi - lo)
        else:
            nlo, nhi = _WIDE_MODES[mode]
            out[finite] = (min(max(lo, nlo), nhi) - nlo) / (nhi - nlo)
    out[np.isposinf(v)] = 1.0
    return np.floor(out * 255.0 + 0.5).astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray, bg: tuple[int, int, int]):
    """``rgb`` (H, W, 3) uint8 with ``alpha`` (H, W) uint8 over the opaque colour ``bg``."""
    from PIL import Image

    a = alpha.astype(np.float64)[..., None]
    out = (rgb.astype(np.float64) * a + np.asarray(bg, np.float64) * (255.0 - a)) / 255.0
    return Image.fromarray(np.floor(out + 0.5).astype(np.uint8), "RGB")
