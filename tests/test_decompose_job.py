"""The decompose job on local Ray (2 CPUs) with a random-initialised tiny model."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from jobutil import BAD, MotoS3, make_images, make_shards, run_cli
from vitdecomp.config import DecomposeConfig, parse_blocks
from vitdecomp.pipeline import run_decompose as run
from vitdecomp.errors import InputError, UnknownModelError
from vitdecomp.store import StoreError, open_store

MODEL = "timm:deit_tiny_patch16_224"
N_BAD = len(BAD) + 1          # + the truncated PNG


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_images(root, n=12)


def reference(valid: dict[str, bytes], ids: list[str], blocks=None, heads=True):
    """In-process decomposition of the same images (the job's numbers must equal these)."""
    torch.manual_seed(0)
    lm = vd.load_model(MODEL)
    x = torch.stack([lm.transform(Image.open(io.BytesIO(valid[i])).convert("RGB")) for i in ids])
    return vd.decompose(lm, x, blocks=blocks, heads=heads)


def cfg(**kw) -> DecomposeConfig:
    base = dict(model=MODEL, batch_size=4, commit_every=4)
    base.update(kw)
    return DecomposeConfig(**base)


def test_folder_to_lance_fp32_equals_in_process(ray_local, corpus, tmp_path):
    root, valid = corpus
    out = tmp_path / "store"
    s = run(cfg(input=str(root), output=str(out), dtype="fp32", label_from_folder=True, blocks="9-11"))
    assert (s.written, s.errors) == (len(valid), N_BAD)
    st = open_store(str(out))
    assert sorted(st.ids()) == sorted(valid)
    errs = st.errors().to_pylist()
    assert sorted(e["image_id"] for e in errs) == sorted([*BAD, "bad/truncated.png"])
    assert all(e["reason"] and e["uri"].endswith(e["image_id"]) for e in errs)

    batches = list(st.iter_batches(batch_size=5, columns=["label"]))
    ids = [i for b in batches for i in b.ids]
    got = np.concatenate([b.contributions for b in batches])
    ref = reference(valid, ids, blocks=[9, 10, 11])
    assert st.names == ref.names and got.shape == tuple(ref.contributions.shape)
    np.testing.assert_allclose(got, ref.contributions.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([b.readout for b in batches]), ref.readout.numpy(), rtol=0, atol=1e-6)
    labels = [v for b in batches for v in b.columns["label"].to_pylist()]
    assert labels == [i.split("/")[0] for i in ids]

    m = st.manifest
    assert m["model"]["name"] == MODEL and m["dtype"] == "fp32" and m["options"]["blocks"] == [9, 10, 11]
    assert m["components"][1] == {"name": "blocks.9.attn.head.0", "column": "c_blocks_9_attn_head_0", "kind": "head",
                                  "path": "blocks.9.attn", "block": 9, "head": 0}
    assert m["preprocess"]["input_size"] == [3, 224, 224] and m["package"]["vitdecomp"] == vd.__version__
    # Lance vector columns are fixed-size lists (vector indexes can be built on them)
    assert pa.types.is_fixed_size_list(st._lance("contributions").schema.field("c_embed").type)

    # a rerun finds everything stored and writes nothing
    s2 = run(cfg(input=str(root), output=str(out), dtype="fp32", label_from_folder=True, blocks="9-11"))
    assert (s2.written, s2.errors, s2.skipped, st.count()) == (0, 0, len(valid) + N_BAD, len(valid))


def test_parquet_output_fp16_resume_and_manifest_mismatch(ray_local, corpus, tmp_path):
    root, valid = corpus
    out = str(tmp_path / "pq")
    s1 = run(cfg(input=str(root), output=out, format="parquet", limit=6, heads=False))
    assert s1.written + s1.errors == 6
    s2 = run(cfg(input=str(root), output=out, format="parquet", heads=False))
    st = open_store(out)
    ids = st.ids()
    assert len(ids) == len(set(ids)) == len(valid) and st.errors().num_rows == N_BAD
    assert s2.skipped == 6
    b = next(st.iter_batches(batch_size=100))
    ref = reference(valid, b.ids, heads=False)
    tol = 2e-3 * float(ref.contributions.abs().max())          # fp16 storage
    np.testing.assert_allclose(b.contributions, ref.contributions.numpy(), rtol=0, atol=tol)
    assert st.read(columns=["c_blocks_3_attn"]).column(0).type == pa.list_(pa.float16(), 192)

    with pytest.raises(StoreError, match=r"differs in \['options', 'components'\]"):
        run(cfg(input=str(root), output=out, format="parquet", heads=True))
    with pytest.raises(StoreError, match="differs in"):
        run(cfg(input=str(root), output=out, format="parquet", heads=False, dtype="fp32"))


def test_table_inputs_uri_and_bytes_and_webdataset(ray_local, corpus, tmp_path):
    root, valid = corpus
    ids = sorted(valid)[:6]
    # Parquet with a URI column (one URI missing) and metadata to pass through
    uris = [str(root / i) for i in ids] + [str(root / "gone.png")]
    pq.write_table(pa.table({"uri": uris, "split": ["train"] * 4 + ["val"] * 3, "weight": list(range(7))}),
                   tmp_path / "index.parquet")
    s = run(cfg(input=str(tmp_path / "index.parquet"), output=str(tmp_path / "a")))
    st = open_store(str(tmp_path / "a"))
    assert (s.written, s.errors) == (6, 1)
    assert "missing" in st.errors().column("reason")[0].as_py()
    t = st.read(columns=["image_id", "uri", "split", "weight"])
    assert sorted(t.column("uri").to_pylist()) == sorted(uris[:6])
    assert t.schema.field("weight").type == pa.int64()

    # Lance table with a bytes column and an explicit id column
    import lance

    lance.write_dataset(pa.table({"key": [f"k{i}" for i in range(6)], "jpg": [valid[i] for i in ids],
                                  "caption": [f"image {i}" for i in ids]}), str(tmp_path / "src.lance"))
    s = run(cfg(input=str(tmp_path / "src.lance"), output=str(tmp_path / "b"), id_column="key", dtype="fp32",
                teacher="open_clip:ViT-S-16"))
    st = open_store(str(tmp_path / "b"))
    assert s.written == 6 and sorted(st.ids()) == [f"k{i}" for i in range(6)]
    b = next(st.iter_batches(batch_size=10, columns=["caption"], teacher=True))
    srcs = [ids[int(k[1:])] for k in b.ids]
    ref = reference(valid, srcs)
    np.testing.assert_allclose(b.contributions, ref.contributions.numpy(), rtol=0, atol=1e-6)
    assert b.columns["caption"].to_pylist() == [f"image {i}" for i in srcs]
    # the teacher column is the teacher's own normalised image embedding of the same images
    torch.manual_seed(0)
    teacher = vd.load_model("open_clip:ViT-S-16")
    tx = torch.stack([teacher.transform(Image.open(io.BytesIO(valid[i])).convert("RGB")) for i in srcs])
    with torch.inference_mode():
        te = teacher.model.encode_image(tx, normalize=True)
    np.testing.assert_allclose(b.teacher, te.numpy(), rtol=0, atol=1e-6)
    assert st.manifest["teacher"]["name"] == "open_clip:ViT-S-16" and st.manifest["teacher"]["dim"] == 384
    with pytest.raises(StoreError, match="has no teacher column"):
        next(open_store(str(tmp_path / "a")).iter_batches(teacher=True))

    # WebDataset shards
    make_shards(tmp_path / "wds", {i: valid[i] for i in sorted(valid)[:7]}, per_shard=3)
    s = run(cfg(input=str(tmp_path / "wds"), output=str(tmp_path / "c"), format="parquet"))
    st = open_store(str(tmp_path / "c"))
    assert s.written == 7 and all(i.startswith("shard-") for i in st.ids())
    assert set(st.read(columns=["cls"]).column("cls").to_pylist()) == {"red", "blue"}


def test_bad_input_fails_before_any_work(ray_local, corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "never"
    with pytest.raises(UnknownModelError, match="did you mean"):
        run(cfg(input=str(root), output=str(out), model="timm:deit_tiny_patch16_22"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        run(cfg(input=str(tmp_path / "empty"), output=str(out)))
    with pytest.raises(InputError, match="does not exist"):
        run(cfg(input=str(tmp_path / "nope"), output=str(out)))
    assert not out.exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        run(cfg(input=str(root), output=str(tmp_path / "a_file" / "store")))
    with pytest.raises(InputError, match="blocks: 'seven'"):
        parse_blocks("seven")
    assert parse_blocks("7-11") == [7, 8, 9, 10, 11] and parse_blocks("-2:") == [-2, -1]


def test_cli_help_config_file_and_flag_override(tmp_path):
    out = subprocess.run([sys.executable, "jobs/decompose.py", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ})
    assert out.returncode == 0
    for flag in ("--input", "--output", "--model", "--pretrained", "--checkpoint", "--format", "--blocks",
                 "--no-heads", "--dtype", "--batch-size", "--concurrency", "--teacher", "--config"):
        assert flag in out.stdout, flag
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args

    (tmp_path / "c.yaml").write_text("model: timm:deit_tiny_patch16_224\nbatch-size: 8\nheads: false\ndtype: fp32\n")
    args = build_parser().parse_args(["decompose", "--config", str(tmp_path / "c.yaml"), "--batch-size", "16",
                                      "--input", "x", "--output", "y"])
    c = config_from_args(args, DecomposeConfig)
    assert (c.batch_size, c.heads, c.dtype, c.model) == (16, False, "fp32", MODEL)
    (tmp_path / "bad.yaml").write_text("batchsize: 8\n")
    args = build_parser().parse_args(["decompose", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(InputError, match="did you mean"):
        config_from_args(args, DecomposeConfig)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_stores_every_image_once(tmp_path):
    root = tmp_path / "imgs"
    valid = make_images(root, n=400, corrupt=True)
    out = tmp_path / "store"
    args = ["decompose.py", "--input", str(root), "--output", str(out), "--model", MODEL, "--batch-size", "4",
            "--commit-every", "8", "--num-cpus", "2", "--format", "lance"]
    p = run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (out / "manifest.json").exists() and open_store(str(out)).count() >= 4:
                break
            if p.poll() is not None:
                pytest.fail("the job ended before it could be killed")
            time.sleep(0.5)
        else:
            pytest.fail("no commit within 300 s")
    finally:
        os.killpg(p.pid, signal.SIGKILL)      # the driver and the local Ray it started
        p.wait()
    partial = open_store(str(out)).count()
    assert 0 < partial < len(valid)
    r = run_cli(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_text, _ = r.communicate(timeout=600)
    assert r.returncode == 0, log_text[-3000:]
    st = open_store(str(out))
    ids = st.ids()
    assert len(ids) == len(set(ids)) == len(valid), (len(ids), len(set(ids)))
    assert sorted(ids) == sorted(valid)
    err_ids = st.errors().column("image_id").to_pylist()
    assert len(err_ids) == len(set(err_ids)) == N_BAD
    from vitdecomp.store.maintenance import check_store

    rep = check_store(st)                       # the killed run's uncommitted files were removed by the rerun
    assert rep.ok and not rep.orphan_files, rep.lines()


@pytest.mark.slow
def test_s3_read_write_with_outage_and_no_credentials_leak(ray_local, corpus, tmp_path, caplog):
    root, valid = corpus
    s3 = MotoS3()
    try:
        c = s3.client()
        c.create_bucket(Bucket="corpus")
        c.create_bucket(Bucket="stores")
        for rel in sorted(valid)[:8]:
            c.put_object(Bucket="corpus", Key=f"imgs/{rel}", Body=valid[rel])
        c.put_object(Bucket="corpus", Key="imgs/bad/broken.jpg", Body=b"\xff\xd8broken")

        def job(fmt):
            return run(cfg(input="s3://corpus/imgs", output=f"s3://stores/{fmt}", format=fmt,
                           s3_endpoint=s3.endpoint, batch_size=2, commit_every=2))

        # a 4 s outage as soon as the first data reaches the store; the job retries (or a rerun resumes)
        import threading

        def outage(fmt, hit):
            marker = "_commits/" if fmt == "parquet" else "contributions.lance/data/"
            deadline = time.time() + 120
            while time.time() < deadline:
                keys = [o["Key"] for o in c.list_objects_v2(Bucket="stores", Prefix=fmt).get("Contents", [])]
                if any(marker in k for k in keys):
                    s3.forwarder.stop()
                    hit.append(time.time())
                    time.sleep(4)
                    s3.forwarder.start()
                    return
                time.sleep(0.05)

        for fmt in ("parquet", "lance"):
            hit = []
            th = threading.Thread(target=outage, args=(fmt, hit))
            th.start()
            try:
                summary = job(fmt)
            except Exception:                 # noqa: BLE001 -- a failed run must be resumable
                th.join()
                summary = job(fmt)
            ended = time.time()
            th.join()
            assert hit and hit[0] < ended, "the outage did not happen while the job ran"
            st = open_store(f"s3://stores/{fmt}", s3_endpoint=s3.endpoint)
            ids = st.ids()
            assert len(ids) == len(set(ids)) == 8, (fmt, len(ids), len(set(ids)))
            assert st.errors().column("image_id").to_pylist() == ["bad/broken.jpg"]
            b = next(st.iter_batches(batch_size=20))
            ref = reference({k: valid[k] for k in valid}, b.ids)
            np.testing.assert_allclose(b.contributions, ref.contributions.numpy(), rtol=0,
                                       atol=2e-3 * float(ref.contributions.abs().max()))
            manifest = c.get_object(Bucket="stores", Key=f"{fmt}/manifest.json")["Body"].read().decode()
            assert os.environ["AWS_SECRET_ACCESS_KEY"] not in manifest
            assert os.environ["AWS_ACCESS_KEY_ID"] not in manifest
            assert summary.total_rows == 8
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    finally:
        s3.close()
