"""An input whose decoding kills the process becomes an error row for that input only.

The decode stage runs each block in a child process (``isolate_decoding``). A native decoder bug is
stood in for by a transform that kills its process on one marked image size; every other input must
come out exactly as decoding in the task itself gives it."""
from __future__ import annotations

import io
import os
import signal
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

import vitdecomp
from vitdecomp.config import DecomposeConfig
from vitdecomp.pipeline import decode as decode_mod
from vitdecomp.pipeline.decode import crash_reason, decode_block

MODEL = "timm:deit_tiny_patch16_224"
S3 = {"endpoint": None, "region": None}
SEGV_SIZE, EXIT_SIZE, RAISE_SIZE = (5, 5), (6, 6), (7, 7)


class CrashingTransform:
    """A picklable transform that kills its process on a ``5x5`` image (SIGSEGV) or a ``6x6`` one
    (``os._exit(139)``), raises on a ``7x7`` one, and turns any other image into float32 CHW pixels.

    It only kills a process other than the one that built it: run in the test process itself, it
    raises instead, so that a broken isolation fails the test rather than killing pytest."""

    def __init__(self) -> None:
        self.owner = os.getpid()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size in (SEGV_SIZE, EXIT_SIZE):
            if os.getpid() == self.owner:
                raise RuntimeError("this input would have killed the test process")
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))       # no core file
            if img.size == SEGV_SIZE:
                os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(139)
        if img.size == RAISE_SIZE:
            raise RuntimeError("the transform failed")
        return torch.from_numpy(np.asarray(img, np.float32).copy()).permute(2, 0, 1)


def png(size: tuple[int, int], colour=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def block(rows: dict[str, Optional[bytes]], input_errors: Optional[dict[str, str]] = None) -> pa.Table:
    """A table as ``decode_block`` receives it (one row per input, in order)."""
    ids, input_errors = list(rows), input_errors or {}
    return pa.table({"image_id": ids, "uri": [f"/corpus/{k}.png" for k in ids],
                     "_bytes": pa.array([rows[k] for k in ids], pa.large_binary()),
                     "_input_error": pa.array([input_errors.get(k) for k in ids], pa.string())})


def by_id(out: pa.Table) -> dict[str, dict]:
    return {r["image_id"]: r for r in out.to_pylist()}


def test_crash_reason_in_words():
    assert crash_reason(-11) == "crashed: the decoder's process died (signal 11, SIGSEGV) on this input"
    assert crash_reason(-9) == "crashed: the decoder's process died (signal 9, SIGKILL) on this input"
    assert crash_reason(139) == "crashed: the decoder's process died (exit code 139) on this input"
    assert crash_reason(None) == "crashed: the decoder's process died on this input"


def test_poison_input_becomes_a_crashed_row_and_the_rest_of_the_block_decodes():
    tf = CrashingTransform()
    good = {f"good{i}": png((2 + i, 3), (10 * i, 20, 30)) for i in range(4)}
    rows = {"good0": good["good0"], "poison": png(SEGV_SIZE), "good1": good["good1"], "odd": png(RAISE_SIZE),
            "garbage": b"garbage bytes", "listed-bad": None, "good2": good["good2"], "good3": good["good3"]}
    listed = {"listed-bad": "dangling symlink: it points to 'x'"}
    t = block(rows, listed)
    out = decode_block(t, tf, None, S3, isolate_decoding=True)
    assert out.column_names == ["image_id", "uri", "_pixels", "_decode_node", "_error"]
    assert out.column("image_id").to_pylist() == list(rows)
    got = by_id(out)
    assert got["poison"]["_error"] == "crashed: the decoder's process died (signal 11, SIGSEGV) on this input"
    assert got["poison"]["_pixels"] is None
    # a Python exception keeps its usual reason; inputs known bad pass through
    assert got["odd"]["_error"] == "failed: RuntimeError: the transform failed"
    assert got["garbage"]["_error"].startswith("undecodable: ImageError: not a supported image format")
    assert got["listed-bad"]["_error"] == listed["listed-bad"]
    # every other input is exactly what decoding in the task itself gives
    ref = by_id(decode_block(t, tf, None, S3))
    assert ref["poison"]["_error"] == "failed: RuntimeError: this input would have killed the test process"
    for k in rows:
        if k != "poison":
            assert got[k] == ref[k], k
    np.testing.assert_array_equal(np.frombuffer(got["good1"]["_pixels"], np.float32).reshape(3, 3, 3)[:, 0, 0],
                                  [10, 20, 30])

    # the child was replaced: the next blocks decode normally, in one call
    for n in (3, 5):
        t2 = block({f"next{i}": png((4, 4), (i, 2 * i, 3 * i)) for i in range(n)})
        out2 = decode_block(t2, tf, None, S3, isolate_decoding=True)
        assert out2.equals(decode_block(t2, tf, None, S3))
        assert out2.column("_error").null_count == n


def test_exit_code_crash_and_two_poisons_in_one_block():
    tf = CrashingTransform()
    rows = {"a": png((3, 3)), "exit": png(EXIT_SIZE), "b": png((4, 2)), "segv": png(SEGV_SIZE), "c": png((2, 4))}
    t = block(rows)
    got = by_id(decode_block(t, tf, None, S3, isolate_decoding=True))
    assert got["exit"]["_error"] == "crashed: the decoder's process died (exit code 139) on this input"
    assert got["segv"]["_error"] == "crashed: the decoder's process died (signal 11, SIGSEGV) on this input"
    ref = by_id(decode_block(t, tf, None, S3))
    for k in ("a", "b", "c"):
        assert got[k]["_error"] is None and got[k] == ref[k]


def test_teacher_pixels_and_all_inputs_known_bad():
    tf = CrashingTransform()
    rows = {"a": png((3, 3)), "poison": png(SEGV_SIZE), "b": png((2, 2), (1, 2, 3))}
    t = block(rows)
    out = decode_block(t, tf, tf, S3, isolate_decoding=True)
    assert out.column_names == ["image_id", "uri", "_pixels", "_decode_node", "_tpixels", "_error"]
    got, ref = by_id(out), by_id(decode_block(t, tf, tf, S3))
    assert got["poison"]["_pixels"] is None and got["poison"]["_tpixels"] is None
    assert got["poison"]["_error"].startswith("crashed: the decoder's process died (signal 11")
    for k in ("a", "b"):
        assert got[k] == ref[k] and got[k]["_tpixels"] == got[k]["_pixels"]
    # nothing to decode: no child needed, same rows
    bad = block({"x": None, "y": None}, {"x": "unreadable: no bytes", "y": "unreadable: no bytes"})
    assert decode_block(bad, tf, None, S3, isolate_decoding=True).equals(decode_block(bad, tf, None, S3))
    empty = block({})
    assert decode_block(empty, tf, None, S3, isolate_decoding=True).equals(decode_block(empty, tf, None, S3))


def test_real_transform_is_identical_through_the_segment_and_the_pipe(monkeypatch):
    tf = vitdecomp.load_model(MODEL, load_weights=False).transform
    rng = np.random.default_rng(0)
    rows = {}
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (224 + 8 * i, 224, 3), dtype=np.uint8)).save(buf, "JPEG")
        rows[f"img{i}"] = buf.getvalue()
    rows["garbage"] = b"not an image"
    t = block(rows)
    ref = decode_block(t, tf, None, S3)
    assert ref.column("_error").null_count == 6
    # a segment that holds only some of the pixels: the rest come back through the pipe
    decode_mod._CHILD._drop_segment()
    monkeypatch.setattr(decode_mod, "MAX_SEGMENT", 2 << 20)        # three images of 3x224x224 float32
    for _ in range(3):                                              # pipe only, then segment + pipe
        assert decode_block(t, tf, None, S3, isolate_decoding=True).equals(ref)
    decode_mod._CHILD._drop_segment()
    monkeypatch.undo()
    for _ in range(2):                                              # pipe only, then segment only
        assert decode_block(t, tf, None, S3, isolate_decoding=True).equals(ref)


def test_the_job_isolates_decoding_by_default():
    assert DecomposeConfig().isolate_decoding is True
    assert DecomposeConfig(isolate_decoding="false").isolate_decoding is False
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args

    args = build_parser().parse_args(["decompose", "--input", "x", "--output", "y", "--no-isolate-decoding"])
    assert config_from_args(args, DecomposeConfig).isolate_decoding is False
