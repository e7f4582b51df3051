"""Idempotent commits: a commit that lands but whose reply is lost is not applied twice.

- On S3 (moto behind an HTTP forwarder that executes the commit request but drops its response once):
  every row exactly once, no error, for Lance (the version manifest PUT) and Parquet (the commit
  record's upload).
- A lost reply that surfaces as an error to our retry (simulated in-process: Lance's commit lands,
  then raises a connection error): the retry sees the chunk's data files in the dataset and stops.
- Only errors that can go away are retried: a ValueError from the commit is raised at once.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from jobutil import MotoS3, synthetic_components, write_store
from s3proxy import ReplyDropper
from vitdecomp.store import Store, open_store
from vitdecomp.store.maintenance import check_store
from vitdecomp.store.store import commit_retryable

COMMIT_REQUEST = {
    # the request that makes a chunk visible: Lance's conditional PUT of the next version's manifest,
    # Parquet's commit record (pyarrow uploads it as a multipart upload; the completing POST commits)
    "lance": lambda method, path: method == "PUT" and "contributions.lance/_versions/" in path,
    "parquet": lambda method, path: method == "POST" and "/_commits/" in path and "uploadId=" in path,
}


def _chunk(names, n, seed):
    c = np.random.default_rng(seed).normal(size=(n, len(names), 4)).astype(np.float32)
    return SimpleNamespace(names=names, contributions=c, readout=c.sum(1)), c


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_lost_commit_reply_on_s3_stores_every_row_once(tmp_path, fmt, monkeypatch, caplog):
    s3 = MotoS3()
    proxy = ReplyDropper(s3.port, drop=lambda m, p: False)
    try:
        s3.client().create_bucket(Bucket="stores")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        comps = synthetic_components(blocks=1, heads=2)
        c0 = np.random.default_rng(0).normal(size=(5, len(comps), 4)).astype(np.float32)
        uri = write_store(f"s3://stores/{fmt}", c0, comps, fmt=fmt)
        st = Store(uri)
        proxy.drop = COMMIT_REQUEST[fmt]                     # from now on: lose the commit's reply, once
        chunk, c1 = _chunk(st.names, 3, 1)
        with caplog.at_level(logging.INFO):
            assert st.append(chunk, ["x1", "x2", "x3"]) == 3   # no error
        assert len(proxy.dropped) == 1, proxy.seen            # the reply was really lost ...
        method, path = proxy.dropped[0]
        st = Store(uri)
        ids = st.read(columns=["image_id"]).column("image_id").to_pylist()
        assert sorted(ids) == [f"img{i:05d}" for i in range(5)] + ["x1", "x2", "x3"]   # ... and applied once
        got = {b: r for bt in st.iter_batches(ids=["x1", "x2", "x3"]) for b, r in zip(bt.ids, bt.contributions)}
        for k, i in enumerate(["x1", "x2", "x3"]):
            np.testing.assert_array_equal(got[i], c1[k])
        assert check_store(st).ok
    finally:
        proxy.close()
        s3.close()


def test_commit_that_landed_but_raised_is_not_repeated(tmp_path, monkeypatch, caplog):
    """Lance: the commit lands, then the call fails with a network error (its reply was lost); the
    retry must find the chunk's files in the latest version and not append them again."""
    import lance

    comps = synthetic_components(blocks=1, heads=1)
    c0 = np.random.default_rng(0).normal(size=(4, len(comps), 4)).astype(np.float32)
    st = open_store(write_store(tmp_path / "s", c0, comps, fmt="lance"))
    real = lance.LanceDataset.commit
    calls = []

    def lossy(uri, *a, **k):
        if not str(uri).endswith("contributions.lance"):     # the lease's own commits pass
            return real(uri, *a, **k)
        calls.append(1)
        ds = real(uri, *a, **k)
        if len(calls) == 1:
            raise OSError("LanceError(IO): Generic S3 error: HTTP error: error sending request: connection reset")
        return ds

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(lossy))
    chunk, _ = _chunk(st.names, 3, 1)
    with caplog.at_level(logging.WARNING, logger="vitdecomp.store.store"):
        st.append(chunk, ["a", "b", "c"])
    monkeypatch.undo()
    assert len(calls) == 1                                     # the retry looked, found it, did not commit again
    assert "had landed although its reply was lost" in caplog.text and "retry 1/" in caplog.text
    ids = open_store(st.uri).read(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == ["a", "b", "c"] + [f"img{i:05d}" for i in range(4)]
    # the commit is tagged with its chunk id (Lance transaction property)
    ds = lance.dataset(st.lance_uri("contributions"))
    txn = ds.read_transaction(ds.version)
    assert set(txn.transaction_properties) == {"vitdecomp.chunk"}

    # errors that do not go away are not retried: a ValueError is raised at once, nothing committed
    def bad(uri, *a, **k):
        if not str(uri).endswith("contributions.lance"):
            return real(uri, *a, **k)
        calls.append(1)
        raise ValueError("Invalid user input: schema mismatch")

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(bad))
    calls.clear()
    with pytest.raises(ValueError, match="schema mismatch"):
        st.append(_chunk(st.names, 1, 2)[0], ["d"])
    assert len(calls) == 1
    monkeypatch.undo()
    assert open_store(st.uri).count() == 7


def test_what_is_retried():
    from lance.commit import CommitConflictError

    assert commit_retryable(ValueError("connection reset")) is None          # a bad value never
    assert commit_retryable(TypeError("x")) is None
    assert commit_retryable(PermissionError("access denied")) is None
    assert commit_retryable(OSError(28, "No space left on device")) is None
    assert commit_retryable(CommitConflictError("Commit conflict for version 3")) == "a concurrent commit (conflict)"
    assert commit_retryable(ConnectionResetError("reset by peer")) == "a network error"
    assert commit_retryable(OSError("LanceError(IO): Generic S3 error: HTTP error: error sending request")) \
        == "a network error"
    assert commit_retryable(OSError("AWS Error SLOW_DOWN during PutObject: Please reduce your request rate "
                                    "(throttled)")) == "throttling"


def test_end_of_run_check_catches_a_commit_applied_twice(tmp_path, monkeypatch):
    """The job's closing check compares the rows the store gained with the rows the run committed; it
    reads the ids (distinctness) only up to a size limit, so the count check must catch a duplicate."""
    from vitdecomp.pipeline import job
    from vitdecomp.store import StoreError

    comps = synthetic_components(blocks=1, heads=1)
    c0 = np.random.default_rng(0).normal(size=(4, len(comps), 4)).astype(np.float32)
    st = open_store(write_store(tmp_path / "s", c0, comps, fmt="lance"))
    chunk, _ = _chunk(st.names, 3, 1)
    st.append(chunk, ["a", "b", "c"])
    ok = job.Summary(written=3)
    assert job._finish(ok, st, 0.0, rows_before=4).total_rows == 7
    monkeypatch.setattr(job, "DISTINCT_CHECK_MAX_ROWS", 0)        # a large store: ids are not read
    with pytest.raises(StoreError, match="holds 7 rows, but 4 were stored before this run and it committed 2"):
        job._finish(job.Summary(written=2), st, 0.0, rows_before=4)
