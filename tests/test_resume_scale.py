"""Resuming without a driver-side id set: the anti-join handle (StoredIds) against Lance and Parquet
stores, local and on S3 (moto), pinned to the store as the run found it; and the decompose job's
resume never gathers the stored ids (Store.ids / Store.done_ids are not called)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobutil import MotoS3, make_images, synthetic_components, write_store
from vitdecomp.pipeline.resume import StoredIds, not_stored
from vitdecomp.store import Store, open_store

MODEL = "timm:deit_tiny_patch16_224"


def _store(path, fmt: str, n: int = 20, errors=("bad/a.png", "bad/b.png")):
    """A store with ids img00000.. img{n-1} as rows and ``errors`` as error rows."""
    comps = synthetic_components(blocks=1, heads=1)
    c = np.random.default_rng(0).normal(size=(n, len(comps), 4)).astype(np.float32)
    uri = write_store(path, c, comps, fmt=fmt)
    st = open_store(uri) if not str(path).startswith("s3://") else Store(uri)
    if errors:
        import time

        err = pa.table({"image_id": list(errors), "uri": [f"/x/{e}" for e in errors], "stage": ["decode"] * len(errors),
                        "reason": ["broken"] * len(errors),
                        "time": pa.array([int(time.time() * 1000)] * len(errors), pa.timestamp("ms", tz="UTC"))})
        st.commit([], err)
    return st


def _append(st, ids):
    from types import SimpleNamespace

    comps = st.names
    c = np.ones((len(ids), len(comps), 4), np.float32)
    st.append(SimpleNamespace(names=comps, contributions=c, readout=c.sum(1)), ids)


def _check(st):
    stored = StoredIds.of(st)
    assert (stored.rows, stored.data_rows) == (22, 20)
    # candidates: some stored rows, an error row, unknown ids, a null; hand-computed answer
    cand = ["img00003", "new1", "bad/a.png", None, "img00019", "img00020", "new1", "bad/zz.png"]
    want = [True, False, True, False, True, False, False, False]
    assert stored.present(cand).tolist() == want
    assert stored.present(pa.array(cand, pa.string())).tolist() == want
    listing = pa.array([f"img{i:05d}" for i in range(0, 30, 2)] + ["bad/b.png", "x"], pa.string())
    keep = not_stored(listing, stored, batch_size=3)           # streamed in batches of 3 stored ids
    assert [v for v, k in zip(listing.to_pylist(), keep) if k] == [f"img{i:05d}" for i in range(20, 30, 2)] + ["x"]
    assert not_stored(listing, None).all()
    # the handle is pinned to the store as it was: rows added later are not seen by it
    _append(st, ["late1", "late2"])
    assert stored.present(["late1", "img00001"]).tolist() == [False, True]
    assert StoredIds.of(open_store(st.uri) if not st.uri.startswith("s3://") else Store(st.uri)
                        ).present(["late1"]).tolist() == [True]
    # the handle holds no ids: it pickles small whatever the store's size
    import pickle

    assert len(pickle.dumps(stored)) < 2000


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_stored_ids_anti_join_local(tmp_path, fmt):
    _check(_store(tmp_path / "s", fmt))


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_stored_ids_anti_join_on_s3(tmp_path, fmt, monkeypatch):
    s3 = MotoS3()
    try:
        s3.client().create_bucket(Bucket="stores")
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
        _check(_store(f"s3://stores/{fmt}", fmt))
    finally:
        s3.close()


def test_empty_store_skips_nothing(tmp_path):
    st = _store(tmp_path / "e", "lance", n=1, errors=())
    stored = StoredIds.of(st)
    assert stored.present(["img00000", "other"]).tolist() == [True, False]
    assert not_stored(pa.array(["img00000", "other"]), stored).tolist() == [False, True]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "table"])
def test_resume_never_gathers_the_stored_ids(ray_local, tmp_path, monkeypatch, source):
    """A resumed job skips stored rows and error rows without Store.ids()/done_ids() (the old
    driver-side set), for a folder (driver-side streamed anti-join) and a table (in the read tasks)."""
    import pyarrow.parquet as pq

    from vitdecomp.config import DecomposeConfig
    from vitdecomp.pipeline import run_decompose
    from vitdecomp.store.maintenance import check_store

    root = tmp_path / "imgs"
    valid = make_images(root, n=10, corrupt=True)
    inp = str(root)
    if source == "table":
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        pq.write_table(pa.table({"image_id": files, "uri": [str(root / f) for f in files]}), tmp_path / "t.parquet")
        inp = str(tmp_path / "t.parquet")
    out = str(tmp_path / "store")
    cfg = DecomposeConfig(input=inp, output=out, model=MODEL, batch_size=4, commit_every=4, limit=7, blocks="11",
                          heads=False, format="lance" if source == "folder" else "parquet")
    s1 = run_decompose(cfg)
    assert s1.written + s1.errors == 7

    def refuse(*a, **k):
        raise AssertionError("the driver gathered every stored id")

    monkeypatch.setattr(Store, "done_ids", refuse)
    monkeypatch.setattr(Store, "ids", refuse)
    s2 = run_decompose(cfg.replace(limit=None))
    st = open_store(out)
    monkeypatch.undo()
    assert s2.skipped == 7 and s1.written + s2.written == len(valid)
    ids = st.read(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(valid)
    assert st.errors().num_rows == s1.errors + s2.errors == 4
    assert check_store(st).ok


def test_hash_collisions_never_skip_an_image(tmp_path, monkeypatch):
    """The listing is keyed by hashes; with every hash made equal (all collide) the answer stays exact."""
    from vitdecomp.pipeline import resume

    st = _store(tmp_path / "c", "parquet", n=6, errors=())
    stored = StoredIds.of(st)
    cand = ["img00001", "zzz", "img00005", "img00099", "img00000"]
    want = [False, True, False, True, False]
    assert not_stored(cand, stored).tolist() == want
    monkeypatch.setattr(resume, "hash", lambda x: 7, raising=False)    # the module's hash(): all collide
    assert not_stored(cand, stored, batch_size=2).tolist() == want


def test_non_ascii_ids_are_skipped(tmp_path):
    comps = synthetic_components(blocks=1, heads=1)
    c = np.zeros((3, len(comps), 4), np.float32)
    st = open_store(write_store(tmp_path / "u", c, comps, ids=["café/1.png", "日本/2.png", "plain/3.png"], fmt="lance"))
    stored = StoredIds.of(st)
    cand = ["日本/2.png", "café/1.png", "café/9.png", "plain/3.png", "x"]
    assert not_stored(cand, stored, batch_size=2).tolist() == [False, False, True, False, True]
    assert stored.present(cand).tolist() == [True, True, False, True, False]


# ---------------------------------------------------------------- table inputs: id uniqueness without a Python set
@pytest.mark.parametrize("spill", [10 ** 9, 500])
def test_id_uniqueness_scan_matches_a_set_in_bounded_memory(spill, monkeypatch):
    """``_scan_ids`` (Arrow group-by; past ``spill`` ids hash-partitioned to disk) finds exactly the duplicate
    ids, their counts and the null ids that a Python set finds — non-ASCII, empty and integer ids included —
    and never builds a Python set of the ids."""
    import builtins

    from vitdecomp.pipeline import sources

    rng = np.random.default_rng(3)
    vals = [None if rng.random() < 0.02 else "" if rng.random() < 0.01 else
            f"img-{rng.integers(0, 6000)}" + "é" * int(rng.integers(0, 3)) for _ in range(12_000)]
    seen, want, nulls = set(), {}, 0
    for v in vals:
        if v is None:
            nulls += 1
        elif v in seen:
            want[v] = want.get(v, 1) + 1
        else:
            seen.add(v)
    batches = pa.table({"id": pa.array(vals, pa.string())}).to_batches(max_chunksize=701)
    real_set = builtins.set
    sizes = []

    class CountingSet(real_set):        # a set that grows with the table would show here
        def add(self, x):
            sizes.append(len(self))
            return super().add(x)

    monkeypatch.setattr(builtins, "set", CountingSet)
    try:
        got = sources._scan_ids(iter(batches), "id", None, None, spill=spill, buckets=5)
    finally:
        monkeypatch.setattr(builtins, "set", real_set)
    assert got == {"rows": len(vals), "nulls": nulls, "dups": want} and len(want) > 1000
    assert max(sizes, default=0) < 100          # (library internals use tiny sets; none holds the ids)
    ints = pa.table({"k": pa.array([5, 7, 5, None, 9, 7, 5], pa.int64())}).to_batches(max_chunksize=2)
    assert sources._scan_ids(iter(ints), "k", None, None, spill=3, buckets=2) == {
        "rows": 7, "nulls": 1, "dups": {"5": 3, "7": 2}}


def test_id_buckets_do_not_depend_on_the_batch():
    """The same id lands in the same bucket whatever its neighbours (empty strings, slices, offsets)."""
    from vitdecomp.pipeline.sources import _id_buckets

    a = pa.array(["abc", "", "zz", "abc", "", "é", "zz", "abc"], pa.string())
    whole = _id_buckets(a, 997)
    parts = np.concatenate([_id_buckets(a.slice(i, 1), 997) for i in range(len(a))])
    assert (whole == parts).all() and whole[0] == whole[3] == whole[7] and whole[2] == whole[6] and whole[1] == 0
    assert len(set(whole[[0, 2, 5]].tolist())) == 3
