"""No input can stop a corpus job: faithful, poison-proof decoding and an account of every input.

References are numpy arrays written by hand (not computed by the code under test)."""
from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vitdecomp.config import DecomposeConfig, OptionError
from vitdecomp.errors import InputError
from vitdecomp.images import ImageError, ImageRejected, decode_image
from vitdecomp.pipeline.decode import decode_block
from vitdecomp.pipeline.sources import _walk_local

MODEL = "timm:deit_tiny_patch16_224"


# ------------------------------------------------------------------------------------ helpers
def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A valid PNG header declaring ``w`` x ``h`` RGB pixels with no pixel data (about 70 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def grey3(rows) -> np.ndarray:
    """A hand-written grey image → the RGB array it must decode to."""
    a = np.array(rows, np.uint8)
    return np.repeat(a[..., None], 3, axis=2)


# ------------------------------------------------------------------------------- decode_image
def test_16bit_grey_is_scaled_not_saturated():
    mid = Image.fromarray(np.full((2, 3), 32768, np.uint16))
    assert mid.mode == "I;16"
    np.testing.assert_array_equal(rgb(decode_image(encode(mid))), grey3([[128, 128, 128], [128, 128, 128]]))
    # a dark 16-bit gradient spans its real range: 1000 → 0, 3000 → 255 (never white throughout)
    grad = Image.fromarray(np.array([[1000, 1500, 2000], [2500, 3000, 1000]], np.uint16))
    got = rgb(decode_image(encode(grad)))
    np.testing.assert_array_equal(got, grey3([[0, 64, 128], [191, 255, 0]]))
    # big-endian 16-bit samples (e.g. from raw/TIFF data) follow the same rule
    be = Image.frombytes("I;16B", (3, 1), np.array([1000, 2000, 3000], ">u2").tobytes())
    np.testing.assert_array_equal(rgb(decode_image(encode(be, "TIFF"))), grey3([[0, 128, 255]]))


def test_32bit_int_and_float():
    i32 = Image.fromarray(np.array([[-100, 0, 100]], np.int32))
    assert i32.mode == "I"
    np.testing.assert_array_equal(rgb(decode_image(encode(i32, "TIFF"))), grey3([[0, 128, 255]]))
    f32 = Image.fromarray(np.array([[0.0, 0.25, 1.0], [np.nan, np.inf, 0.5]], np.float32))
    assert f32.mode == "F"
    np.testing.assert_array_equal(rgb(decode_image(encode(f32, "TIFF"))), grey3([[0, 64, 255], [0, 255, 128]]))
    # constant images: their value in the mode's nominal range (I: 0..65535, F: 0..1), clipped to it
    const_f = Image.fromarray(np.full((1, 2), 0.5, np.float32))
    np.testing.assert_array_equal(rgb(decode_image(encode(const_f, "TIFF"))), grey3([[128, 128]]))
    const_i = Image.fromarray(np.full((1, 2), 70000, np.int32))
    np.testing.assert_array_equal(rgb(decode_image(encode(const_i, "TIFF"))), grey3([[255, 255]]))


def test_alpha_is_composited_on_white_or_a_given_background():
    rgba = Image.fromarray(np.array([[[100, 50, 0, 51], [100, 50, 0, 0], [100, 50, 0, 255]]], np.uint8), "RGBA")
    data = encode(rgba)
    np.testing.assert_array_equal(rgb(decode_image(data)),
                                  np.array([[[224, 214, 204], [255, 255, 255], [100, 50, 0]]], np.uint8))
    np.testing.assert_array_equal(rgb(decode_image(data, alpha_background=(10, 20, 30))),
                                  np.array([[[28, 26, 24], [10, 20, 30], [100, 50, 0]]], np.uint8))
    np.testing.assert_array_equal(rgb(decode_image(data, alpha_background="#0a141e")),
                                  np.array([[[28, 26, 24], [10, 20, 30], [100, 50, 0]]], np.uint8))
    la = Image.fromarray(np.array([[[100, 51], [100, 0], [100, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(rgb(decode_image(encode(la))),
                                  np.array([[[224, 224, 224], [255, 255, 255], [100, 100, 100]]], np.uint8))
    np.testing.assert_array_equal(rgb(decode_image(encode(la), alpha_background=(10, 20, 30))),
                                  np.array([[[28, 36, 44], [10, 20, 30], [100, 100, 100]]], np.uint8))
    with pytest.raises(InputError, match="unknown colour 'nope'"):
        decode_image(data, alpha_background="nope")


def test_palette_with_a_transparent_index():
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    p.putdata([0, 1, 2])
    for fmt in ("PNG", "GIF"):
        data = encode(p, fmt, transparency=1)
        np.testing.assert_array_equal(rgb(decode_image(data)),
                                      np.array([[[255, 0, 0], [255, 255, 255], [0, 0, 255]]], np.uint8), err_msg=fmt)
        np.testing.assert_array_equal(rgb(decode_image(data, alpha_background="black")),
                                      np.array([[[255, 0, 0], [0, 0, 0], [0, 0, 255]]], np.uint8), err_msg=fmt)


def test_exif_orientation_6_is_applied():
    # stored 32 wide x 16 high: left half red, right half blue; orientation 6 = rotate 90° clockwise
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    got = rgb(decode_image(data))
    want = np.zeros((32, 16, 3), np.uint8)          # displayed 16 wide x 32 high: red on top, blue below
    want[:16] = (255, 0, 0)
    want[16:] = (0, 0, 255)
    assert got.shape == want.shape
    inner = np.r_[0:12, 20:32]                      # away from the JPEG-blurred boundary
    np.testing.assert_allclose(got[inner].astype(int), want[inner].astype(int), atol=24)


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (4, 3), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(rgb(decode_image(data)), np.full((3, 4, 3), (255, 0, 0), np.uint8))


def test_bomb_is_refused_quickly_without_decoding():
    data = bomb_png()
    assert len(data) < 100
    limit_before = Image.MAX_IMAGE_PIXELS
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # Pillow's DecompressionBombWarning must not even be emitted
        with pytest.raises(ImageRejected) as e:
            decode_image(data)
    assert time.perf_counter() - t < 0.5
    msg = str(e.value)
    assert "30000x30000 = 900 Mpx" in msg and "over the limit of 89.5 Mpx" in msg and "max_pixels" in msg
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_raises_and_lowers_the_limit(monkeypatch):
    img = encode(Image.new("RGB", (100, 100), (1, 2, 3)))
    with pytest.raises(ImageRejected, match=r"100x100 = 10000 px, over the limit of 9999 px"):
        decode_image(img, max_pixels=9999)
    assert decode_image(img, max_pixels=10000).size == (100, 100)
    assert decode_image(img, max_pixels=None).size == (100, 100)
    # Pillow's own (global) limit never decides: below it Pillow would raise DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected, match="over the limit of 1000 px"):
        decode_image(img)                           # the default limit is Pillow's, read at call time
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(rgb(decode_image(img, max_pixels=20000)), np.full((100, 100, 3), (1, 2, 3)))
    assert Image.MAX_IMAGE_PIXELS == 1000           # restored after each call
    with pytest.raises(InputError, match="max_pixels must be a positive"):
        decode_image(img, max_pixels=0)


def test_errors_say_what_is_wrong_in_words():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = encode(Image.fromarray(noise))
    cases = {b"": "empty file", b"this is not an image": "not a supported image format",
             good[: len(good) // 2]: "corrupt or truncated PNG data", good[:40]: "corrupt or truncated PNG data",
             encode(Image.fromarray(noise), "JPEG")[:300]: "corrupt or truncated JPEG data"}
    for data, words in cases.items():
        with pytest.raises(ImageError) as e:
            decode_image(data)
        assert words in str(e.value) and " at 0x" not in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ decode stage
def _transform(img: Image.Image) -> torch.Tensor:
    if img.size == (7, 7):
        raise RuntimeError("the transform failed")
    return torch.from_numpy(np.asarray(img, np.float32).copy()).permute(2, 0, 1)


def test_decode_block_turns_every_bad_input_into_its_own_error_row(tmp_path):
    good = encode(Image.new("RGB", (2, 2), (10, 20, 30)))
    rgba = encode(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    rows = {"good": good, "bomb": bomb_png(), "garbage": b"garbage bytes", "empty": b"",
            "truncated": good[: len(good) // 2], "odd-size": encode(Image.new("RGB", (7, 7))), "rgba": rgba,
            "listed-bad": None, "gone": None}
    t = pa.table({"image_id": list(rows), "uri": [f"/x/{k}" for k in list(rows)[:-1]] + [str(tmp_path / "gone.png")],
                  "_bytes": pa.array(list(rows.values()), pa.large_binary()),
                  "_input_error": pa.array([None] * 7 + ["dangling symlink: it points to 'x'", None], pa.string())})
    out = decode_block(t, _transform, None, {"endpoint": None, "region": None}, max_pixels=None,
                       alpha_background="black")
    assert out.column_names == ["image_id", "uri", "_pixels", "_decode_node", "_error"]
    err = dict(zip(out.column("image_id").to_pylist(), out.column("_error").to_pylist()))
    px = dict(zip(out.column("image_id").to_pylist(), out.column("_pixels").to_pylist()))
    assert err["good"] is None and err["rgba"] is None
    np.testing.assert_array_equal(np.frombuffer(px["good"], np.float32).reshape(3, 2, 2)[:, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(np.frombuffer(px["rgba"], np.float32), np.zeros(12))   # on black
    # max_pixels=None is Pillow's default limit: the bomb is refused, not decoded
    assert err["bomb"].startswith("rejected: ImageRejected: PNG image is 30000x30000")
    assert err["garbage"].startswith("undecodable: ImageError: not a supported image format")
    assert err["empty"] == "undecodable: ImageError: empty file (0 bytes)"
    assert err["truncated"].startswith("undecodable: ImageError: corrupt or truncated PNG data")
    assert err["odd-size"] == "failed: RuntimeError: the transform failed"
    assert err["listed-bad"] == "dangling symlink: it points to 'x'"
    assert err["gone"].startswith("missing: FileNotFoundError:")
    assert all(px[k] is None for k in rows if k not in ("good", "rgba"))
    assert all("\n" not in e and " at 0x" not in e for e in err.values() if e)


def test_config_options_are_validated():
    assert DecomposeConfig(alpha_background="#102030", max_pixels=5).max_pixels == 5
    with pytest.raises(OptionError, match="alpha_background: unknown colour 'nope'"):
        DecomposeConfig(alpha_background="nope")
    with pytest.raises(OptionError, match="max_pixels"):
        DecomposeConfig(max_pixels=0)


# ------------------------------------------------------------------------------ folder listing
def hostile_folder(root) -> dict[str, bytes]:
    """Good images and every kind of hostile entry; returns the good images' id → bytes."""
    rng = np.random.default_rng(0)
    good = {}
    for i in range(4):
        rel = f"{'ab'[i % 2]}/good{i}.{'png' if i % 2 else 'jpg'}"
        good[rel] = encode(Image.fromarray(rng.integers(0, 255, (24 + i, 20, 3), dtype=np.uint8)),
                           "PNG" if i % 2 else "JPEG")
    good["wide16.png"] = encode(Image.fromarray(np.array([[1000, 3000], [2000, 1500]], np.uint16)))
    good["alpha.png"] = encode(Image.new("RGBA", (8, 8), (200, 10, 10, 100)))
    good["new\nline.png"] = encode(Image.new("RGB", (9, 9), (1, 2, 3)))
    for rel, data in good.items():
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    (root / ".hidden.png").write_bytes(good["a/good0.jpg"])
    os.symlink("nowhere.png", root / "dangling.png")
    os.symlink("..", root / "a" / "up")                                  # a directory cycle
    os.symlink("good0.jpg", root / "a" / "alias.jpg")                    # the same file twice
    with open(os.path.join(os.fsencode(root), b"bad\xffname.png"), "wb") as f:   # not UTF-8
        f.write(good["a/good0.jpg"])
    return good


ERRORS = {"bomb.png", "garbage.jpg", "dangling.png", "a/up", "bad\\xffname.png"}


def test_local_listing_visits_each_file_once_and_accounts_for_every_entry(tmp_path):
    good = hostile_folder(tmp_path)
    listing = _walk_local(str(tmp_path))
    files = [e.rel for e in listing.entries if e.error is None]
    errors = {e.rel: e.error for e in listing.entries if e.error}
    assert sorted(files) == sorted([*good, "bomb.png", "garbage.jpg"])
    assert set(errors) == ERRORS - {"bomb.png", "garbage.jpg"}
    assert "cycle" in errors["a/up"] and "dangling symlink" in errors["dangling.png"]
    assert "not valid UTF-8" in errors["bad\\xffname.png"]
    assert listing.skipped == {"hidden": 1, "duplicate file": 1}
    assert [e.by_uri for e in listing.entries if e.rel == "new\nline.png"] == [True]


# ------------------------------------------------------------------------------- table inputs
def test_table_ids_must_be_unique_and_present_unless_deduped(ray_local, tmp_path):
    from vitdecomp.pipeline.sources import open_source

    img = str(tmp_path / "x.png")
    Image.new("RGB", (4, 4)).save(img)
    pq.write_table(pa.table({"key": ["a", "b", "a", None, "c", "b", "d"],
                             "uri": [img, img, "/first/not/this", img, img, img, None]}), tmp_path / "t.parquet")
    with pytest.raises(OptionError, match=r"id_column: .*2 ids occur more than once \(\['a', 'b'\]\)"
                                          r".*1 rows have no id"):
        open_source(str(tmp_path / "t.parquet"), id_column="key")
    src = open_source(str(tmp_path / "t.parquet"), id_column="key", dedupe_ids=True)
    assert src.notes["skipped_by_rule"] == 3 and src.notes["inputs"] == 7
    rows = {r["image_id"]: r for r in src.dataset.take_all()}
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["a"]["uri"] == img and rows["d"]["_input_error"] == "no image: the URI is null"
    assert rows["c"]["_input_error"] is None


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_decompose_job_on_a_hostile_folder(ray_local, tmp_path):
    from vitdecomp.pipeline import run_decompose
    from vitdecomp.store import open_store

    root = tmp_path / "in"
    root.mkdir()
    good = hostile_folder(root)
    cfg = DecomposeConfig(input=str(root), output=str(tmp_path / "store"), model=MODEL, batch_size=4,
                          commit_every=4, format="parquet")
    s = run_decompose(cfg)
    st = open_store(str(tmp_path / "store"))
    ids = st.ids()
    assert sorted(ids) == sorted(good) and len(set(ids)) == len(ids)
    errors = {e["image_id"]: e["reason"] for e in st.errors().to_pylist()}
    assert set(errors) == ERRORS
    assert errors["bomb.png"].startswith("rejected: ImageRejected:")
    assert (s.written, s.errors, s.skipped_by_rule) == (len(good), len(ERRORS), 2)
    assert s.inputs == s.written + s.errors + s.skipped_by_rule == len(good) + len(ERRORS) + 2
    assert f"inputs {s.inputs} = {len(good)} rows + {len(ERRORS)} errors + 2 skipped by rule" in str(s)
    s2 = run_decompose(cfg)
    assert (s2.written, s2.errors, st.count(), open_store(str(tmp_path / "store")).errors().num_rows) == \
        (0, 0, len(good), len(ERRORS))


@pytest.mark.slow
def test_decompose_job_on_a_hostile_table(ray_local, tmp_path):
    """A table input with URIs and bytes: a bomb, garbage, a 16-bit PNG, a null URI, a missing file and a
    repeated id (kept once with dedupe_ids) — every input accounted for, good rows stored once."""
    from vitdecomp.pipeline import run_decompose
    from vitdecomp.store import open_store

    def png(arr, mode=None):
        buf = io.BytesIO()
        (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, "PNG")
        return buf.getvalue()

    good = png(np.full((20, 20, 3), 90, np.uint8))
    on_disk = tmp_path / "disk.png"
    on_disk.write_bytes(png(np.full((16, 16, 3), 200, np.uint8)))
    rows = [("good", None, good), ("disk", str(on_disk), None), ("wide16", None, png(
        (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150))),
        ("bomb", None, bomb_png()), ("garbage", None, b"not an image at all"), ("nothing", None, None),
        ("gone", str(tmp_path / "gone.png"), None), ("good", None, png(np.zeros((8, 8, 3), np.uint8)))]
    t = pa.table({"image_id": [r[0] for r in rows], "uri": pa.array([r[1] for r in rows], pa.string()),
                  "image": pa.array([r[2] for r in rows], pa.binary())})
    pq.write_table(t, tmp_path / "t.parquet")
    cfg = DecomposeConfig(input=str(tmp_path / "t.parquet"), output=str(tmp_path / "store"), model=MODEL,
                          batch_size=3, commit_every=3, dedupe_ids=True)
    s = run_decompose(cfg)
    st = open_store(str(tmp_path / "store"))
    assert sorted(st.ids()) == ["disk", "good", "wide16"]
    errors = {e["image_id"]: e["reason"] for e in st.errors().to_pylist()}
    assert set(errors) == {"bomb", "garbage", "nothing", "gone"}
    assert errors["bomb"].startswith("rejected:") and errors["gone"].startswith("missing:")
    assert (s.written, s.errors, s.skipped_by_rule, s.inputs) == (3, 4, 1, 8)
    assert s.inputs == s.written + s.errors + s.skipped_by_rule
    s2 = run_decompose(cfg)
    assert (s2.written, s2.errors) == (0, 0) and open_store(str(tmp_path / "store")).count() == 3
