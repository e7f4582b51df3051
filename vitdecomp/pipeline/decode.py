"""Decode stage: image bytes or URIs → the model's preprocessed pixels, or an error reason per input.

Every exception raised while reading, decoding or preprocessing one input becomes that input's error
row (``_error``: one line, ``"<kind>: <ExceptionType>: <message>"``); the rest of the block goes on.
Inputs that arrive with ``_input_error`` set (a listing or table problem found by the source:
dangling symlink, unreadable entry, no URI and no bytes, ...) are passed through as error rows.

A decoder can also kill its process (a segfault in a native image library, an abort, the OOM
killer), which no ``except`` can catch. With ``isolate_decoding`` (the decompose job's default) a
block is therefore decoded in a child process of the worker: one per worker process, started on
first use from a forkserver (children fork from a server process that has only imported modules,
never from the multi-threaded Ray worker itself) and reused across blocks. When the child dies, it is replaced and
the block is decoded again input by input, so that exactly the inputs that kill it become error
rows (``"crashed: the decoder's process died (signal N) on this input"``) and every other input is
decoded as usual. The child writes the pixels into a shared-memory segment of the worker (reserved
up front, grown to the largest block seen), from which the worker copies them once, as it would
copy them into Arrow in the task itself; pixels that do not fit come back through the pipe.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from ..io import S3Settings, read_bytes
from .placement import node_id

log = logging.getLogger(__name__)

INPUT_ERROR = "_input_error"      # set by the sources for inputs known bad before reading
MAX_REASON = 500                  # characters kept of an error reason
CRASHED = "crashed: the decoder's process died"
START_TIMEOUT_S = 600.0           # the decoding child must answer its first call within this
SEGMENT_STEP = 1 << 20            # the shared segment for pixels grows in whole MiB ...
MAX_SEGMENT = 1 << 30             # ... up to this; pixels beyond it come through the pipe

# modules the forkserver imports once, so that each (re)started child forks with them loaded
_PRELOAD = ("vitdecomp.pipeline.decode", "vitdecomp.images", "numpy", "PIL.Image", "torch",
            "torchvision.transforms")


class DecodeIsolationError(RuntimeError):
    """The decoding child process cannot be used: it does not start, or cannot load the transforms."""


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


def _death(exitcode: Optional[int]) -> Optional[str]:
    """How a process with ``exitcode`` died, in words (negative: the signal that killed it)."""
    if exitcode is None:
        return None
    if exitcode < 0:
        import signal

        try:
            return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def crash_reason(exitcode: Optional[int]) -> str:
    """The reason of an input whose decoding killed the child process with ``exitcode`` (None: unknown)."""
    how = _death(exitcode)
    return f"{CRASHED} ({how}) on this input" if how else f"{CRASHED} on this input"


def _to_bytes(a: np.ndarray) -> bytes:
    """A transform's output as float32 bytes (what decoding in the task itself keeps)."""
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def _decode_inputs(data: Sequence[Optional[bytes]], uris: Sequence[Optional[str]], given: Sequence[Optional[str]],
                   transform: Callable, teacher_transform: Optional[Callable], s3: dict,
                   max_pixels: Optional[int], alpha_background: str, keep: Callable[[np.ndarray], Any] = _to_bytes
                   ) -> tuple[list, list, list[Optional[str]]]:
    """Each input → (its pixels, its teacher's pixels, its error reason), in this process.

    ``keep`` turns a transform's output (as a numpy array) into what is kept of it (default: its
    float32 bytes); None where an input has no pixels.
    """
    from ..images import DEFAULT, decode_image, parse_color

    limit = DEFAULT if max_pixels is None else max_pixels
    bg = parse_color(alpha_background)
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
                px = keep(transform(img).numpy())
                if teacher_transform is not None:
                    tpx = keep(teacher_transform(img).numpy())
            except Exception as e:  # noqa: BLE001 — one bad input must never fail the block
                err, px, tpx = reason_for(e), None, None
                log.debug("input %r: %s", uri, err)
        pixels.append(px)
        tpixels.append(tpx)
        errors.append(err)
    return pixels, tpixels, errors


# ------------------------------------------------------------------------ in the child process
Entry = Union[None, tuple[int, int], bytes]     # no pixels | (offset, length) in the segment | the bytes
Packed = tuple[list[int], Any]                   # per-input lengths (-1: no pixels) and one buffer
_child_transforms: Optional[tuple[bytes, Any]] = None
_child_segment: Any = None                       # the worker's SharedMemory, attached in the child


class _Sink:
    """Where the child puts pixels: the shared segment while they fit, else the reply itself."""

    def __init__(self, buf: Optional[memoryview]):
        self.buf = buf
        self.used = 0                            # bytes written to the segment
        self.wanted = 0                          # bytes of every input's pixels (sizes the next segment)

    def __call__(self, a: np.ndarray) -> Entry:
        mv = memoryview(np.ascontiguousarray(a, dtype=np.float32)).cast("B")
        n = mv.nbytes
        self.wanted += n
        if self.buf is not None and self.used + n <= len(self.buf):
            self.buf[self.used:self.used + n] = mv
            self.used += n
            return (self.used - n, n)
        return mv.tobytes()


def _attach(segment: Optional[tuple[str, int]]) -> Optional[memoryview]:
    """The worker's segment ``(name, size)`` mapped in the child (kept across calls), or None."""
    global _child_segment
    if segment is None:
        return None
    name, size = segment
    if _child_segment is None or _child_segment.name != name:
        from multiprocessing.shared_memory import SharedMemory

        old, _child_segment = _child_segment, None
        if old is not None:
            old.close()
        _child_segment = SharedMemory(name=name)
    return _child_segment.buf[:size]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _child_init(worker_pid: int) -> None:
    """Runs first in the child: a watchdog thread ends the child as soon as the worker process that
    owns it is gone (killed, or exited without its exit handlers: Ray kills a worker's own children,
    not this grandchild), unlinking the worker's shared segment on the way."""
    def watch() -> None:
        try:
            fd = os.pidfd_open(worker_pid)
        except ProcessLookupError:
            fd = None                                    # already gone
        except (AttributeError, OSError):               # no pidfd here: poll
            fd = None
            while _alive(worker_pid):
                time.sleep(1.0)
        if fd is not None:
            import select

            select.select([fd], [], [])                 # readable once the worker has exited
        if _child_segment is not None:                  # best effort (Linux); the worker owned it
            try:
                os.unlink(os.path.join("/dev/shm", _child_segment.name))
            except OSError:
                pass
        os._exit(0)

    threading.Thread(target=watch, name="vitdecomp-decode-watchdog", daemon=True).start()


def _child_ping() -> int:
    """Runs in the child: proves that it started."""
    return os.getpid()


def _child_decode(data: list, uris: list, given: list, blob: bytes, s3: dict, max_pixels: Optional[int],
                  alpha_background: str, threads: Optional[int], segment: Optional[tuple[str, int]]) -> tuple:
    """Runs in the child: :func:`_decode_inputs` on the inputs, with the transforms pickled in ``blob``,
    pixels written to the worker's shared ``segment`` where they fit.

    Returns ``("ok", errors, pixel entries, teacher pixel entries or None, bytes wanted)``, or
    ``("setup", reason)`` when the transforms or the segment cannot be loaded here.
    """
    global _child_transforms
    try:
        if _child_transforms is None or _child_transforms[0] != blob:
            _child_transforms = (blob, pickle.loads(blob))
        if threads is not None:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        buf = _attach(segment)
    except Exception as e:  # noqa: BLE001 — reported to the worker, which fails the block in words
        return ("setup", f"{type(e).__name__}: {' '.join(str(e).split()) or '(no message)'}")
    transform, teacher_transform = _child_transforms[1]
    sink = _Sink(buf)
    try:
        pixels, tpixels, errors = _decode_inputs(data, uris, given, transform, teacher_transform, s3, max_pixels,
                                                 alpha_background, keep=sink)
        wanted = sink.wanted
    finally:
        del buf, sink                            # no view of the segment may outlive the call
    return ("ok", errors, pixels, tpixels if teacher_transform is not None else None, wanted)


# ----------------------------------------------------------------------- in the worker process
class _ChildDied(Exception):
    """The decoding child died during a call; ``exitcode`` as :attr:`multiprocessing.Process.exitcode`."""

    def __init__(self, exitcode: Optional[int]):
        super().__init__(exitcode)
        self.exitcode = exitcode


class _DecodeChild:
    """This worker process's decoding child (a one-process pool, started on first use, replaced when it
    dies) and the shared segment it writes pixels into."""

    def __init__(self) -> None:
        self.lock = threading.Lock()          # one block at a time per worker process
        self._pool = None
        self._proc = None
        self._segment = None                  # SharedMemory owned by this process
        self._size = 0                        # bytes of it the child may write
        self._shared = True                   # False once no segment could be reserved: pixels use the pipe

    def reset_after_fork(self) -> None:
        """In a forked copy of this process the pool's threads do not exist: forget them (and the
        segment, which the original process owns)."""
        self.lock = threading.Lock()
        self._pool = self._proc = self._segment = None
        self._size = 0

    def _start(self, preload: list[str]) -> None:
        """Start the child (and this process's forkserver, importing ``preload``, if not running yet)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        t0 = time.monotonic()
        ctx = multiprocessing.get_context("forkserver")
        # used when this process starts its forkserver; without "__main__", so that the server does
        # not import the main script (a Ray worker's main)
        ctx.set_forkserver_preload(preload)
        try:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_child_init,
                                       initargs=(os.getpid(),))
        except Exception as e:  # noqa: BLE001
            raise DecodeIsolationError(f"could not create the decoding child process ({type(e).__name__}: {e}); "
                                       "pass --no-isolate-decoding to decode in the task itself") from e
        try:
            pid = pool.submit(_child_ping).result(timeout=START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 — a child that cannot run a no-op: not the input's fault
            pool.shutdown(wait=False, cancel_futures=True)
            raise DecodeIsolationError(f"the decoding child process did not start ({type(e).__name__}: {e}); "
                                       "pass --no-isolate-decoding to decode in the task itself") from e
        self._pool = pool
        self._proc = next(iter(getattr(pool, "_processes", {}).values()), None)
        log.debug("decoding child process %d started in %.2f s", pid, time.monotonic() - t0)

    def _discard(self) -> Optional[int]:
        """Shut the broken pool down; the dead child's exit code (None if unknown)."""
        pool, proc = self._pool, self._proc
        self._pool = self._proc = None
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except Exception as e:  # noqa: BLE001
            log.debug("shutting the broken decoding pool down: %s", e)
        if proc is None:
            return None
        proc.join(timeout=10)
        return proc.exitcode

    def decode(self, preload: list[str], *args) -> tuple[list[Optional[str]], Packed, Optional[Packed]]:
        """:func:`_child_decode` on ``args`` in the child (started if needed) → (errors, pixels,
        teacher pixels); raises :class:`_ChildDied` if the child dies."""
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            self._start(preload)
        segment = None if self._segment is None else (self._segment.name, self._size)
        try:
            result = self._pool.submit(_child_decode, *args, segment).result()
        except BrokenProcessPool:
            raise _ChildDied(self._discard()) from None
        if result[0] == "setup":
            raise DecodeIsolationError(f"the decoding child process could not load the model's transforms or "
                                       f"the shared segment ({result[1]}); pass --no-isolate-decoding to decode "
                                       "in the task itself")
        _, errors, pixels, tpixels, wanted = result
        out = (errors, self._take(pixels), None if tpixels is None else self._take(tpixels))
        self._fit(wanted)
        return out

    def _take(self, entries: Sequence[Entry]) -> Packed:
        """The child's pixel entries → one Arrow buffer (the only copy of them in this process, into
        Arrow's memory pool as in the task itself)."""
        lens = [-1 if e is None else e[1] if isinstance(e, tuple) else len(e) for e in entries]
        out = pa.allocate_buffer(sum(n for n in lens if n > 0))
        dst = memoryview(out).cast("B")
        src = None if self._segment is None else self._segment.buf
        at = 0
        try:
            for e, n in zip(entries, lens):
                if n > 0:
                    dst[at:at + n] = src[e[0]:e[0] + n] if isinstance(e, tuple) else e
                    at += n
        finally:
            del dst, src                      # release the views of the buffers
        return lens, out

    def _fit(self, wanted: int) -> None:
        """Grow the segment (for the next calls) when a call had more pixels than it holds."""
        target = min(-(-int(wanted * 1.25) // SEGMENT_STEP) * SEGMENT_STEP, MAX_SEGMENT)
        if not self._shared or target <= self._size:
            return
        from multiprocessing.shared_memory import SharedMemory

        self._drop_segment()
        try:
            seg = SharedMemory(create=True, size=target)
        except OSError as e:
            self._no_segment(target, e)
            return
        fd = getattr(seg, "_fd", -1)
        if hasattr(os, "posix_fallocate") and fd >= 0:
            try:      # reserve the pages now: a full /dev/shm must not kill the child (SIGBUS) on a write
                os.posix_fallocate(fd, 0, target)
            except OSError as e:
                seg.close()
                seg.unlink()
                self._no_segment(target, e)
                return
        self._segment, self._size = seg, target

    def _no_segment(self, size: int, e: OSError) -> None:
        """No segment can be reserved: from now on pixels come back through the pipe."""
        self._shared = False
        log.warning("could not reserve %d MiB of shared memory for decoded pixels (%s: %s); the decoding child "
                    "sends them through a pipe instead (slower)", size >> 20, type(e).__name__, e)

    def _drop_segment(self) -> None:
        """Free the segment (the child maps the next one it is given)."""
        seg, self._segment, self._size = self._segment, None, 0
        if seg is not None:
            seg.close()
            seg.unlink()

    def close(self) -> None:
        """Stop the child and free the segment (at exit)."""
        pool, self._pool, self._proc = self._pool, None, None
        try:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self._drop_segment()
        except Exception as e:  # noqa: BLE001 — at exit: nothing left to report to
            log.debug("closing the decoding child: %s", e)


_CHILD = _DecodeChild()
atexit.register(_CHILD.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CHILD.reset_after_fork)


def _preload_for(*transforms: Optional[Callable]) -> list[str]:
    """Modules for the forkserver to import: the decode stage's own and the transforms' classes'."""
    mods = list(_PRELOAD)
    if "ray" in sys.modules:
        # each child runs the worker's main module again as ``__mp_main__`` (multiprocessing does this
        # for every start method but fork); in a Ray worker that module imports Ray
        mods.append("ray")
    for t in transforms:
        if t is None:
            continue
        for x in [t, *(getattr(t, "transforms", None) or [])]:
            m = getattr(type(x), "__module__", None)
            if m and m not in ("builtins", "__main__") and m not in mods:
                mods.append(m)
    return mods


def _dumps(obj: Any) -> bytes:
    """``obj`` pickled with Ray's cloudpickle (anything Ray can ship as a task argument)."""
    try:
        from ray import cloudpickle
    except ImportError:  # pragma: no cover — Ray is a dependency
        cloudpickle = pickle
    try:
        return cloudpickle.dumps(obj)
    except Exception as e:  # noqa: BLE001
        raise DecodeIsolationError(f"the model's transforms cannot be sent to the decoding child process "
                                   f"({type(e).__name__}: {e}); pass --no-isolate-decoding to decode in the "
                                   "task itself") from e


def _decode_isolated(data: list, uris: list, given: list, transform: Callable, teacher_transform: Optional[Callable],
                     s3: dict, max_pixels: Optional[int], alpha_background: str
                     ) -> list[tuple[list[Optional[str]], Packed, Optional[Packed]]]:
    """The block decoded in the child: (errors, pixels, teacher pixels) per call (one call unless it died)."""
    blob = _dumps((transform, teacher_transform))
    threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    preload = _preload_for(transform, teacher_transform)
    rest = (blob, s3, max_pixels, alpha_background, threads)
    nothing = ([-1], b"")
    with _CHILD.lock:
        try:
            return [_CHILD.decode(preload, data, uris, given, *rest)]
        except _ChildDied as died:
            log.warning("the decoding child process died (%s) on a block of %d inputs; decoding them one by one",
                        _death(died.exitcode) or "cause unknown", len(data))
        results, crashed = [], 0
        for b, uri, pre in zip(data, uris, given):
            if pre is None:
                try:
                    results.append(_CHILD.decode(preload, [b], [uri], [None], *rest))
                    continue
                except _ChildDied as died:
                    crashed += 1
                    pre = crash_reason(died.exitcode)
                    log.warning("input %r: %s", uri, pre)
            results.append(([pre], nothing, nothing if teacher_transform is not None else None))
        if not crashed:
            log.warning("every input of the block decoded on its own: the child's death was not caused by one input")
        return results


def _binary_array(parts: Sequence[Packed]) -> pa.Array:
    """Packed pixels → a ``large_binary`` array (null where there are none); one part is not copied."""
    lens = np.fromiter((n for ls, _ in parts for n in ls), np.int64)
    data = parts[0][1] if len(parts) == 1 else b"".join(memoryview(d) for _, d in parts)
    data = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    valid = lens >= 0
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(np.where(valid, lens, 0), out=offsets[1:])
    nulls = int(len(lens) - valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()) if nulls else None
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lens),
                                            [validity, pa.py_buffer(offsets), data], nulls)


def decode_block(t: pa.Table, transform, teacher_transform, s3: dict, max_pixels: Optional[int] = None,
                 alpha_background: str = "white", isolate_decoding: bool = False) -> pa.Table:
    """Bytes or URI → preprocessed float32 pixels (``_pixels``), or ``_error`` with the reason.

    ``max_pixels``: images declaring more pixels are refused (None: Pillow's default limit);
    ``alpha_background``: colour transparent pixels are composited on (see :mod:`vitdecomp.images`);
    ``isolate_decoding``: decode in this worker process's child process, so that an input that kills
    the decoder becomes a ``crashed`` error row (the decompose job passes True; direct calls default
    to decoding in this process).
    """
    n = t.num_rows
    data = t.column("_bytes").to_pylist() if "_bytes" in t.column_names else [None] * n
    given = t.column(INPUT_ERROR).to_pylist() if INPUT_ERROR in t.column_names else [None] * n
    uris = t.column("uri").to_pylist() if "uri" in t.column_names else [None] * n
    if isolate_decoding and any(g is None for g in given):
        results = _decode_isolated(data, uris, given, transform, teacher_transform, s3, max_pixels, alpha_background)
        errors = [e for r in results for e in r[0]]
        pixels = _binary_array([r[1] for r in results])
        tpixels = _binary_array([r[2] for r in results]) if teacher_transform is not None else None
    else:
        px, tpx, errors = _decode_inputs(data, uris, given, transform, teacher_transform, s3, max_pixels,
                                         alpha_background)
        pixels = pa.array(px, pa.large_binary())
        tpixels = pa.array(tpx, pa.large_binary()) if teacher_transform is not None else None
    out = t.drop_columns([c for c in ("_bytes", INPUT_ERROR) if c in t.column_names])
    out = out.append_column("_pixels", pixels)
    out = out.append_column("_decode_node", pa.array([node_id()] * n, pa.string()))
    if teacher_transform is not None:
        out = out.append_column("_tpixels", tpixels)
    return out.append_column("_error", pa.array(errors, pa.string()))
