"""A writer's lease on a store: at most one decompose run writes a store at a time.

The lease is a one-row Lance dataset next to the store (``<store>/_lease.lance``: holder id, host,
pid, process start time, command, renewal time and expiry). Taking or renewing it is a
compare-and-swap: an ``Overwrite`` committed with the ``read_version`` the holder saw, which Lance
refuses when anyone committed in between (conditional PUTs on S3, atomic renames locally). So two
runs started at the same moment cannot both hold it.

A lease expires ``ttl`` seconds after its last renewal (the holder renews every ``ttl / 4`` from a
background thread), so a crashed holder blocks nobody for long. Commits are fenced by time, not only
by a failed renewal: :meth:`Lease.check` (called before every commit) lets a commit through only while
the holder's own lease has more than half its ``ttl`` left, renewing it on the spot otherwise, and
stops the run when it cannot. Another run takes a lease over only once it has expired (or its holder's
process is gone), so a holder whose renewals stalled — a starved thread, an unreachable store —
never commits after its lease could have been taken over (the taker's snapshot of stored ids would
miss that commit, and both runs would store its images). A holder on the same host whose
process is gone is taken over at once (a rerun right after a crash does not wait). Format-agnostic:
Parquet stores use the same Lance lease.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

from ..errors import VitdecompError

log = logging.getLogger(__name__)

LEASE = "_lease.lance"
DEFAULT_TTL = 120.0


class StoreBusyError(VitdecompError):
    """Another run holds the store's lease."""


class LeaseLostError(VitdecompError):
    """This run's lease was taken over (it was not renewed in time): it must stop writing."""


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    pid_started: float
    command: str
    renewed: float
    expires: float

    def describe(self) -> str:
        age = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.renewed))
        return (f"run {self.holder[:8]} on {self.host} (pid {self.pid}, {self.command or 'vitdecomp'}), "
                f"last renewed {age}, expires in {max(0.0, self.expires - time.time()):.0f} s")


def _process_started(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 -- psutil.NoSuchProcess/AccessDenied/ImportError: unknown
        return None


def _alive_here(info: LeaseInfo) -> bool:
    """False when the holder ran on this host and its process is gone (or the pid was reused)."""
    if info.host != socket.gethostname():
        return True                                   # cannot tell: trust the expiry
    started = _process_started(info.pid)
    return started is not None and abs(started - info.pid_started) < 1.0


class Lease:
    """The lease of the store whose Lance location is ``uri`` (``<store>/_lease.lance``).

    ``with Lease(...).held(command) as lease:`` acquires (or raises :class:`StoreBusyError` naming
    the holder), renews in the background, and releases on exit; :meth:`check` raises
    :class:`LeaseLostError` if the lease was lost (call it before every commit)."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None, ttl: float = DEFAULT_TTL):
        self.uri = uri
        self.storage_options = storage_options
        self.ttl = float(ttl)
        self.holder = uuid.uuid4().hex
        self._version: Optional[int] = None
        self._lost: Optional[str] = None
        self._expires = 0.0
        self._lock = threading.Lock()                  # renewals by the thread and by check() take turns
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._command = ""

    # ------------------------------------------------------------------ state
    def _row(self, expires: float) -> dict:
        pid = os.getpid()
        return {"holder": self.holder, "host": socket.gethostname(), "pid": pid,
                "pid_started": _process_started(pid) or 0.0, "command": self._command,
                "renewed": time.time(), "expires": expires}

    def read(self) -> tuple[Optional[int], Optional[LeaseInfo]]:
        """(version, holder info) of the lease, or (None, None) when no lease was ever taken."""
        import lance

        try:
            ds = lance.dataset(self.uri, storage_options=self.storage_options)
        except (ValueError, OSError, FileNotFoundError):
            return None, None
        rows = ds.to_table().to_pylist()
        return ds.version, (LeaseInfo(**rows[0]) if rows else None)

    def _write(self, row: dict, read_version: Optional[int]) -> Optional[int]:
        """Compare-and-swap: the new version, or None when someone else committed first."""
        import lance
        import pyarrow as pa

        table = pa.Table.from_pylist([row])
        try:
            if read_version is None:
                ds = lance.write_dataset(table, self.uri, mode="create", storage_options=self.storage_options)
                return ds.version
            frags = lance.fragment.write_fragments(table, self.uri, storage_options=self.storage_options)
            op = lance.LanceOperation.Overwrite(table.schema, frags)
            ds = lance.LanceDataset.commit(self.uri, op, read_version=read_version,
                                           storage_options=self.storage_options)
            return ds.version
        except Exception as e:  # noqa: BLE001 -- Lance's conflict errors have no stable public type
            text = f"{type(e).__name__}: {e}"
            if "onflict" in text or "already exists" in text or "preempted" in text:
                return None
            raise

    # ------------------------------------------------------------------ protocol
    def acquire(self, command: str = "") -> None:
        self._command = command
        for _ in range(20):
            version, info = self.read()
            now = time.time()
            if info is not None and info.holder != self.holder and info.expires > now and _alive_here(info):
                raise StoreBusyError(
                    f"the store is being written by another run: {info.describe()}. Two runs must not write one "
                    "store at once; wait for it to finish (a crashed run's lease expires on its own), or write to "
                    "another output location")
            new = self._write(self._row(now + self.ttl), version)
            if new is not None:
                self._version, self._expires = new, now + self.ttl
                if info is not None and info.holder != self.holder and info.expires > now:
                    log.warning("took over the lease of a run whose process is gone (%s)", info.describe())
                return
            time.sleep(0.05)                           # someone committed in between: look again
        raise StoreBusyError("could not take the store's lease: other runs keep taking it")

    def renew(self) -> None:
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self._lost:
            raise LeaseLostError(self._lost)
        now = time.time()
        new = self._write(self._row(now + self.ttl), self._version)
        if new is None:
            _, info = self.read()
            self._lost = ("this run's lease on the store was taken over by "
                          f"{info.describe() if info else 'another run'}: stop so that rows are not written twice")
            raise LeaseLostError(self._lost)
        self._version, self._expires = new, now + self.ttl

    def check(self) -> None:
        """Before a commit: raise :class:`LeaseLostError` unless this run's lease is certainly still its own
        for a while. With more than ``ttl / 2`` left it is; otherwise it is renewed now (a compare-and-swap
        that fails if another run took it over). If that renewal fails for another reason and less than
        ``ttl / 4`` is left, the run stops too: the commit could land after the lease expired and another
        run started from a snapshot without it. A rerun resumes where it stopped."""
        with self._lock:
            if self._lost:
                raise LeaseLostError(self._lost)
            if self._expires - time.time() > self.ttl / 2:
                return
            try:
                self._renew()
            except LeaseLostError:
                raise
            except Exception as e:  # noqa: BLE001 -- a transient error: enough time left, or stop
                left = self._expires - time.time()
                if left > self.ttl / 4:
                    log.warning("renewing the store's lease before a commit failed (%s); it is held %.0f s more, "
                                "committing", e, left)
                    return
                self._lost = (f"this run's lease on the store could not be renewed ({type(e).__name__}: {e}) and "
                              f"expires in {max(0.0, left):.0f} s: stopping before a commit another run could "
                              "duplicate; rerun to resume")
                raise LeaseLostError(self._lost) from e

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:                               # a renewal in flight ends first: release sees its version
            if self._lost or self._version is None:
                return
            try:
                self._write({**self._row(0.0), "expires": 0.0}, self._version)
            except Exception as e:  # noqa: BLE001 -- releasing is best effort: the lease expires anyway
                log.warning("could not release the store's lease (%s); it expires within %.0f s", e, self.ttl)
            self._version, self._expires = None, 0.0

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLostError:
                log.error("%s", self._lost)
                return
            except Exception as e:  # noqa: BLE001 -- a transient error: retry at the next tick
                log.warning("renewing the store's lease failed (%s); retrying", e)

    def start(self, command: str = "") -> "Lease":
        self.acquire(command)
        self._thread = threading.Thread(target=self._renew_loop, name="vitdecomp-lease", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def info_dict(info: Optional[LeaseInfo]) -> Optional[dict]:
    return asdict(info) if info else None
