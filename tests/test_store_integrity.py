"""Store integrity under misuse: one writer at a time (the lease), `store check` / `store repair` on
planted duplicates and orphans, atomic metadata, and outputs left clean by refused or failed runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobutil import MotoS3, make_images, run_cli, synthetic_components, write_store
from vitdecomp.store import StoreError, open_store
from vitdecomp.store.lease import Lease, StoreBusyError
from vitdecomp.store.maintenance import check_store, orphan_files, repair_store

MODEL = "timm:deit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parents[1]


def _planted(tmp_path, fmt: str, n: int = 12):
    comps = synthetic_components(blocks=1, heads=2)
    rng = np.random.default_rng(0)
    c = rng.normal(size=(n, len(comps), 8)).astype(np.float32)
    path = write_store(tmp_path / f"s-{fmt}", c, comps, columns={"label": [f"l{i % 3}" for i in range(n)]}, fmt=fmt)
    return open_store(path), c


def _plant_duplicates_and_orphans(st, ids):
    """Commit a second copy of ``ids`` (as a concurrent run would have) and leave an uncommitted file."""
    rows = st.read(ids=ids)
    if st.format == "lance":
        import lance

        frags = lance.fragment.write_fragments(rows, st.lance_uri("contributions"), schema=st.schema())
        st.commit([{"fragment": json.loads(f.to_json()) if isinstance(f.to_json(), str) else f.to_json()}
                   for f in frags], None)
        lance.fragment.write_fragments(rows, st.lance_uri("contributions"), schema=st.schema())   # never committed
    else:
        name = f"contributions/{uuid.uuid4().hex}.parquet"
        pq.write_table(rows, st._p(name), filesystem=st.fs)
        st.commit([{"file": name, "rows": rows.num_rows}], None)
        pq.write_table(rows, st._p(f"contributions/{uuid.uuid4().hex}.parquet"), filesystem=st.fs)   # orphan


def _plant_orphan(st):
    """Rows written but never committed (a commit that was cut off). The rows are copied as stored
    (physical columns: a compact store's coefficients, not the expanded contributions)."""
    if st.format == "lance":
        rows = st._lance("contributions").to_table().slice(0, 2)
    else:
        rows = pq.read_table(st._parquet_files("contributions")[0], filesystem=st.fs).slice(0, 2)
    if st.format == "lance":
        import lance

        lance.fragment.write_fragments(rows, st.lance_uri("contributions"), schema=st.schema())
    else:
        pq.write_table(rows, st._p(f"contributions/{uuid.uuid4().hex}.parquet"), filesystem=st.fs)


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_check_and_repair_planted_duplicates_and_orphans(tmp_path, fmt):
    st, c = _planted(tmp_path, fmt)
    before = {r["image_id"]: r for r in st.read().to_pylist()}
    assert check_store(st).ok
    dup = ["img00001", "img00004", "img00007"]
    _plant_duplicates_and_orphans(st, dup)
    st = open_store(st.uri)
    rep = check_store(st)
    assert not rep.ok
    assert rep.duplicates["contributions"] == {i: 2 for i in dup} and rep.rows == 12 + 3
    assert len(rep.orphan_files) == 1 and not rep.missing_files
    assert any("store repair" in line for line in rep.lines())

    dry = repair_store(st)                                     # a dry run changes nothing
    assert not dry.applied and any("3 surplus rows" in a for a in dry.actions)
    assert check_store(open_store(st.uri)).duplicates["contributions"] == {i: 2 for i in dup}

    done = repair_store(open_store(st.uri), apply=True)
    assert done.applied
    st = open_store(st.uri)
    after = check_store(st)
    assert after.ok, after.lines()
    rows = st.read().to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(before)
    for r in rows:                                             # every kept row is the original, value for value
        assert r == before[r["image_id"]]
    b = next(st.iter_batches(batch_size=100))
    np.testing.assert_allclose(b.contributions, c[[int(i[3:]) for i in b.ids]], atol=0)


def test_cli_store_check_exit_codes(tmp_path):
    st, _ = _planted(tmp_path, "parquet")
    ok = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "store", "check", st.uri], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok"), ok.stdout + ok.stderr
    _plant_duplicates_and_orphans(st, ["img00002"])
    bad = subprocess.run([sys.executable, "-m", "vitdecomp.cli", "store", "check", st.uri], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 1 and "img00002" in bad.stdout and "store repair" in bad.stdout


def test_lease_is_exclusive_expires_and_is_taken_over_from_a_dead_process(tmp_path):
    uri = str(tmp_path / "s" / "_lease.lance")
    a = Lease(uri, ttl=60).start("a")
    b = Lease(uri, ttl=60)
    with pytest.raises(StoreBusyError, match=r"being written by another run: run .* \(pid \d+, a\)"):
        b.acquire("b")
    a.renew()
    a.release()
    b.start("b")                                               # released: free at once
    b.release()
    # a holder whose process is gone (here: a child that exited) is taken over without waiting
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from vitdecomp.store.lease import Lease; "
            f"Lease({uri!r}, ttl=600).acquire('dead')")
    subprocess.run([sys.executable, "-c", code], check=True)
    _, info = Lease(uri).read()
    assert info.command == "dead" and info.expires > time.time() + 500
    c = Lease(uri, ttl=60).start("c")
    assert Lease(uri).read()[1].holder == c.holder
    c.release()
    # an expired lease is free even when its holder may live elsewhere
    short = Lease(uri, ttl=0.5)
    short.acquire("short")
    time.sleep(0.7)
    d = Lease(uri, ttl=60).start("d")
    with pytest.raises(Exception, match="taken over"):
        short.renew()
    d.release()


def test_a_holder_whose_renewals_stalled_never_commits_after_a_takeover(tmp_path, monkeypatch):
    """The race behind two concurrent runs storing images twice: a holder whose background renewals
    stalled (starved thread, unreachable store) keeps committing until a renewal *fails*; a run that
    took the expired lease over in between has snapshotted the stored ids without those commits.
    ``check()`` (before every commit) must refuse as soon as the lease may have been taken over."""
    uri = str(tmp_path / "s" / "_lease.lance")
    a = Lease(uri, ttl=0.8)
    a.acquire("a")                                            # no renewal thread: its renewals "stalled"
    a.check()                                                 # fresh: more than ttl/2 left, no renewal needed
    time.sleep(0.9)                                           # expired
    b = Lease(uri, ttl=60).start("b")                         # taken over, legitimately
    with pytest.raises(Exception, match="taken over"):
        a.check()                                             # was: passed (only a failed renewal was noticed)
    b.release()
    # the store cannot be reached for the renewal: with under ttl/4 left the run stops instead of committing
    c = Lease(uri, ttl=0.8)
    c.acquire("c")
    time.sleep(0.65)
    monkeypatch.setattr(c, "_write", lambda *a, **k: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(Exception, match="could not be renewed .*connection reset.*rerun to resume"):
        c.check()
    # a healthy holder near expiry renews on the spot and commits
    uri = str(tmp_path / "s2" / "_lease.lance")
    d = Lease(uri, ttl=0.8)
    d.acquire("d")
    time.sleep(0.5)
    d.check()
    assert Lease(uri).read()[1].expires > time.time() + 0.6
    d.release()


def test_metadata_is_atomic_and_damage_is_one_clear_line(tmp_path):
    st, _ = _planted(tmp_path, "parquet")
    names = os.listdir(st.path)
    assert not [n for n in names if n.endswith(".tmp")]
    rec = sorted((Path(st.path) / "_commits").glob("*.json"))[0]
    rec.write_text(rec.read_text()[:20])                       # a torn write (simulated)
    with pytest.raises(StoreError, match=r"commit record .* is unreadable .*vitdecomp store repair"):
        open_store(st.uri).count()
    st2, _ = _planted(tmp_path / "m", "lance")
    mf = Path(st2.path) / "manifest.json"
    mf.write_text(mf.read_text()[:30])
    with pytest.raises(StoreError, match="manifest.json is unreadable"):
        open_store(st2.uri)


def _decompose_args(src, out, fmt, extra=()):
    return ["decompose.py", "--input", str(src), "--output", str(out), "--model", MODEL, "--batch-size", "8",
            "--commit-every", "8", "--num-cpus", "2", "--format", fmt, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_two_runs_at_once_store_every_image_once(tmp_path, fmt):
    src = tmp_path / "imgs"
    valid = make_images(src, n=40, corrupt=True)
    out = tmp_path / "store"
    procs = [run_cli(_decompose_args(src, out, fmt), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), (codes, [o[-2000:] for o in outs])
    if codes == [0, 2]:
        refused = outs[[p.returncode for p in procs].index(2)]
        assert "being written by another run" in refused and "Traceback" not in refused, refused[-2000:]
    st = open_store(str(out))
    ids = st.ids()
    assert sorted(ids) == sorted(valid) and len(ids) == len(set(ids))
    errs = st.errors().column("image_id").to_pylist()
    assert len(errs) == len(set(errs)) == 4
    assert check_store(st).ok


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_two_runs_at_once_on_s3_store_every_image_once(tmp_path, fmt):
    src = tmp_path / "imgs"
    valid = make_images(src, n=24, corrupt=False)
    s3 = MotoS3()
    try:
        s3.client().create_bucket(Bucket="stores")
        out = "s3://stores/concurrent"
        extra = ["--s3-endpoint", s3.endpoint]
        procs = [run_cli(_decompose_args(src, out, fmt, extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True) for _ in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes in ([0, 0], [0, 2]), (codes, [o[-2000:] for o in outs])
        st = open_store(out, s3_endpoint=s3.endpoint)
        ids = st.ids()
        assert sorted(ids) == sorted(valid) and len(ids) == len(set(ids))
    finally:
        s3.close()


@pytest.mark.slow
def test_refused_and_failed_runs_leave_no_store_and_orphans_are_cleaned(ray_local, tmp_path):
    from vitdecomp.config import DecomposeConfig
    from vitdecomp.errors import InputError
    from vitdecomp.pipeline import run_decompose

    src = tmp_path / "imgs"
    valid = make_images(src, n=10, corrupt=False)
    out = tmp_path / "store"
    # a checkpoint that does not fit the architecture is refused before any work: nothing is written
    import torch
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InputError, match="checkpoint"):
        run_decompose(DecomposeConfig(input=str(src), output=str(out), model=MODEL,
                                      checkpoint=str(tmp_path / "wrong.safetensors")))
    assert not out.exists()
    # a run into a store, then uncommitted files (a cut-off commit) are removed by the next run
    cfg = DecomposeConfig(input=str(src), output=str(out), model=MODEL, batch_size=4, commit_every=4, limit=4)
    run_decompose(cfg)
    st = open_store(str(out))
    _plant_orphan(st)
    assert orphan_files(open_store(str(out)))
    s = run_decompose(cfg.replace(limit=None))
    st = open_store(str(out))
    assert s.written == len(valid) - 4 and not orphan_files(st) and check_store(st).ok
    assert sorted(st.ids()) == sorted(valid)
