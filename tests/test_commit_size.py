"""Exact commit sizes and no orphans.

- ``--commit-every N``: every commit holds at most N images (rows + error rows), read back from the
  store's own history (Lance versions grouped by the chunk tag each commit carries; Parquet commit
  records).
- After a real SIGKILL of a decompose run mid-commit, its uncommitted files (orphans) are removed by
  ``vitdecomp store vacuum`` (refused while another run holds the store's lease) and by the next run,
  which then stores every image exactly once.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobutil import make_images, run_cli
from vitdecomp.store import open_store
from vitdecomp.store.lease import LEASE, Lease
from vitdecomp.store.maintenance import check_store, orphan_files

MODEL = "timm:deit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parents[1]
N_BAD = 4                                  # make_images(corrupt=True) adds 4 undecodable files


def commit_sizes(st) -> list[int]:
    """Images (rows + error rows) of every commit of the store, oldest first, from its history."""
    if st.format == "parquet":
        return [sum(int(w["rows"]) for w in rec["files"]) for _, rec in st.commit_records()]
    import lance

    per_chunk: dict[str, int] = {}
    for table in ("errors", "contributions"):
        ds = lance.dataset(st.lance_uri(table))
        prev = 0
        for v in [x["version"] for x in ds.versions()]:
            rows = lance.dataset(st.lance_uri(table), version=v).count_rows()
            chunk = (ds.read_transaction(v).transaction_properties or {}).get("vitdecomp.chunk")
            if chunk is not None:
                per_chunk[chunk] = per_chunk.get(chunk, 0) + rows - prev
            prev = rows
    return [per_chunk[k] for k in sorted(per_chunk, key=lambda c: int(c.rsplit("-", 1)[1]))]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_commit_every_is_an_upper_bound(ray_local, tmp_path, fmt):
    from vitdecomp.config import DecomposeConfig
    from vitdecomp.pipeline import run_decompose

    root = tmp_path / "imgs"
    valid = make_images(root, n=13, corrupt=True)
    n, every = len(valid) + N_BAD, 3
    # batches of 4 (> N) and errors mixed in: the old driver committed whole batches past N
    s = run_decompose(DecomposeConfig(input=str(root), output=str(tmp_path / "s"), model=MODEL, batch_size=4,
                                      commit_every=every, blocks="11", heads=False, format=fmt))
    st = open_store(str(tmp_path / "s"))
    sizes = commit_sizes(st)
    assert sum(sizes) == n and (s.written, s.errors) == (len(valid), N_BAD)
    assert max(sizes) <= every, sizes
    assert len(sizes) == s.commits >= math.ceil(n / every)
    assert check_store(st).ok


def _kill_with_orphans(out: Path, args: list[str]) -> None:
    """Run the decompose job and SIGKILL it (with the local Ray it started) at a moment when at least one
    chunk is committed and written files wait for the next commit."""
    p = run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            if p.poll() is not None:
                pytest.fail("the job ended before it could be killed")
            if (out / "manifest.json").exists():
                try:
                    st = open_store(str(out))
                    if st.count() > 0 and orphan_files(st):
                        os.killpg(p.pid, signal.SIGKILL)
                        break
                except Exception:  # noqa: BLE001 -- a store being created: look again
                    pass
            time.sleep(0.1)
        else:
            pytest.fail("no moment with committed rows and uncommitted files within 400 s")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.slow
def test_sigkill_leaves_orphans_that_vacuum_and_the_next_run_remove(tmp_path):
    root = tmp_path / "imgs"
    valid = make_images(root, n=120, corrupt=True)
    out = tmp_path / "store"
    args = ["decompose.py", "--input", str(root), "--output", str(out), "--model", MODEL, "--batch-size", "2",
            "--commit-every", "8", "--num-cpus", "2", "--blocks", "11", "--no-heads", "--format", "lance"]
    _kill_with_orphans(out, args)
    time.sleep(2)                                     # a write task that outlived the kill by a moment
    st = open_store(str(out))
    orphans = orphan_files(st)
    rows = st.count()
    assert orphans and 0 < rows < len(valid)
    copy = tmp_path / "store-copy"                   # the same killed store, for the next-run path
    shutil.copytree(out, copy, symlinks=True)

    # vacuum is refused while another run holds the lease (its files would be in flight)
    other = Lease(st.lance_uri(LEASE[:-len(".lance")]), ttl=60).start("another writer")
    try:
        busy = subprocess.run([sys.executable, str(ROOT / "jobs" / "store.py"), "vacuum", str(out)],
                              capture_output=True, text=True, cwd=ROOT)
    finally:
        other.release()
    assert busy.returncode == 2 and "being written by another run" in busy.stderr, busy.stdout + busy.stderr
    assert sorted(orphan_files(open_store(str(out)))) == sorted(orphans)

    done = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "store", "vacuum", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and f"removed {len(orphans)} orphan files" in done.stdout, done.stdout + done.stderr
    st = open_store(str(out))
    assert not orphan_files(st) and st.count() == rows and check_store(st).ok
    again = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "store", "vacuum", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "no orphan files" in again.stdout

    # the next run (on the copy) removes them too, and stores every image exactly once
    assert orphan_files(open_store(str(copy)))
    r = run_cli([a if a != str(out) else str(copy) for a in args], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
    log_text, _ = r.communicate(timeout=900)
    assert r.returncode == 0, log_text[-3000:]
    assert "orphan files left by an earlier run" in log_text
    st = open_store(str(copy))
    ids = st.read(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(valid)
    assert st.errors().num_rows == N_BAD
    rep = check_store(st)
    assert rep.ok and not rep.orphan_files, rep.lines()
