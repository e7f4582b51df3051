"""The one I/O layer (vitdecomp.io): source images from local paths, S3 and WebDataset shard members;
output directories on local disk and S3 (moto on 127.0.0.1), used by the fit and query jobs."""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobutil import MotoS3, make_shards, synthetic_components, write_store
from vitdecomp.errors import InputError
from vitdecomp.io import (OutputDir, S3Settings, UndecodableImageError, open_output, read_bytes, read_image, split,
                          split_member, write_bytes)

BUCKET = "iotest"
COLOURS = [(230, 20, 40), (20, 200, 60), (30, 40, 220), (240, 220, 30), (200, 30, 210), (10, 10, 10)]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3():
    server = MotoS3()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        server.settings = S3Settings(endpoint=server.endpoint, region="us-east-1")
        yield server
    finally:
        server.close()


def _coloured(i: int, fmt: str) -> bytes:
    """A mostly uniform image of ``COLOURS[i]`` with some texture (distinct sizes per image)."""
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(COLOURS[i], np.int16) + rng.integers(-12, 13, (30 + 3 * i, 34, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    """Six coloured images in a folder and in two WebDataset shards, locally and on S3."""
    root = tmp_path_factory.mktemp("iocorpus")
    images = {f"c{i % 2}/img{i:02d}.{'png' if i % 3 else 'jpg'}": _coloured(i, "PNG" if i % 3 else "JPEG")
              for i in range(len(COLOURS))}
    for rel, data in images.items():
        (root / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "imgs" / rel).write_bytes(data)
    shards = make_shards(root / "shards", images, per_shard=4)
    c = s3.client()
    for rel, data in images.items():
        c.put_object(Bucket=BUCKET, Key=f"imgs/{rel}", Body=data)
    for sh in shards:
        c.put_object(Bucket=BUCKET, Key=f"shards/{sh.name}", Body=sh.read_bytes())
    # where each image lives, four ways; the WebDataset key is the path without extension, '/' -> '_'
    entries = []
    for n, (rel, data) in enumerate(sorted(images.items())):
        key = rel.rsplit(".", 1)[0].replace("/", "_")
        shard = shards[n // 4].name
        entries.append({"rel": rel, "bytes": data, "pixels": np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                        "uris": [str(root / "imgs" / rel), f"s3://{BUCKET}/imgs/{rel}",
                                 f"{root / 'shards' / shard}#{key}", f"s3://{BUCKET}/shards/{shard}#{key}"]})
    return {"root": root, "entries": entries, "shards": shards}


# --------------------------------------------------------------------------------------------- reading
def test_read_image_local_s3_and_shard_members(corpus, s3):
    for e in corpus["entries"]:
        for uri in e["uris"]:
            img = read_image(uri, s3.settings)
            assert img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(img), e["pixels"], err_msg=uri)
            assert read_bytes(uri, s3.settings) == e["bytes"]
    assert split_member("s3://b/x/shard-0001.TAR#a/b.c") == ("s3://b/x/shard-0001.TAR", "a/b.c")
    assert split_member("/data/img#1.png") == ("/data/img#1.png", None)      # '#' outside a shard is a name


def test_shard_member_is_streamed_not_loaded(corpus, tmp_path, monkeypatch):
    """The shard is read as a stream up to the member: a large member after it is never read."""
    import vitdecomp.io as vio

    e = corpus["entries"][0]
    key = e["uris"][2].rsplit("#", 1)[1]
    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in ((f"{key}.txt", b"hi"),                                  # same key, not an image
                              (f"{key}.{e['rel'].rsplit('.', 1)[1]}", e["bytes"]),
                              ("zzz.bin", bytes(8 << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    read = []
    real = vio._source

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            b = self.f.read(n)
            read.append(len(b))
            return b

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def counting_source(uri, s3):
        fs, p = real(uri, s3)
        return type("FS", (), {"open_input_stream": staticmethod(lambda q: Counting(fs.open_input_stream(q)))})(), p

    monkeypatch.setattr(vio, "_source", counting_source)
    np.testing.assert_array_equal(np.asarray(read_image(f"{shard}#{key}")), e["pixels"])
    assert 0 < sum(read) < 1 << 20 < shard.stat().st_size


def test_unreadable_sources_raise_naming_the_uri(corpus, s3, tmp_path):
    shard = str(corpus["shards"][0])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 200)
    cases = [(str(tmp_path / "missing.png"), FileNotFoundError),
             (f"s3://{BUCKET}/imgs/missing.png", FileNotFoundError),
             (f"s3://no-such-bucket/x.png", FileNotFoundError),
             (f"{shard}#no_such_key", FileNotFoundError),
             (f"{tmp_path / 'missing.tar'}#k", FileNotFoundError),
             (f"{tmp_path / 'junk.tar'}#k", OSError),
             (str(tmp_path), OSError),                                        # a directory
             ("http://example.invalid/x.png", OSError)]                      # no request is made
    for uri, kind in cases:
        with pytest.raises(kind) as ei:
            read_image(uri, s3.settings)
        assert uri in str(ei.value), (uri, str(ei.value))
    with pytest.raises(UndecodableImageError, match=re.escape(str(tmp_path / "junk.png"))) as ei:
        read_image(str(tmp_path / "junk.png"))
    assert isinstance(ei.value, OSError)


# --------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("where", ["local", "s3"])
def test_output_dir(where, s3, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uri = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/outdir-test/run"
    out = open_output(uri, s3.settings)
    assert open_output(out) is out and not out.exists()
    out.makedirs()
    assert out.uri() == uri and out.uri("a/b.txt") == uri + "/a/b.txt"
    out.write_bytes("sub/x.bin", b"\x00\x01")
    out.write_text("t.txt", "héllo")
    out.write_json("j.json", {"a": [1, 2]})
    out.write_parquet("t.parquet", pa.table({"x": [1, 2, 3]}))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert out.savefig("f.png", fig, dpi=30) == out.uri("f.png")
    assert not plt.get_fignums()                                                # closed
    assert out.read_bytes("sub/x.bin") == b"\x00\x01" and out.read_text("t.txt") == "héllo"
    assert json.loads(out.read_bytes("j.json")) == {"a": [1, 2]}
    assert pq.read_table(out.open_input_file("t.parquet")).column("x").to_pylist() == [1, 2, 3]
    assert Image.open(io.BytesIO(out.read_bytes("f.png"))).format == "PNG"
    assert out.list() == ["f.png", "j.json", "t.parquet", "t.txt"] and out.list(".json") == ["j.json"]
    assert out.is_file("t.txt") and out.is_dir("sub") and out.exists("sub") and not out.exists("nope")
    out.write_text("t.txt", "replaced")                                        # overwrite in place
    assert out.read_text("t.txt") == "replaced"
    assert out.relative("sub/../f.png") == "f.png" and out.relative(out.uri("sub/x.bin")) == "sub/x.bin"
    assert out.relative("../x") is None and out.relative(out.uri()) is None
    with pytest.raises(FileNotFoundError, match=re.escape(out.uri("gone"))):
        out.read_bytes("gone")
    if where == "local":
        assert out.storage_options is None and out.lance_uri("i.lance") == str(tmp_path / "out" / "i.lance")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.png", "j.json", "sub", "t.parquet",
                                                                         "t.txt"]   # no temporary files left
        assert split(str(tmp_path / "out" / "a")) == (str(tmp_path / "out"), "a")
    else:
        assert out.storage_options["aws_endpoint"] == s3.endpoint and out.lance_uri("i.lance") == uri + "/i.lance"
        keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="outdir-test/")["Contents"])
        assert keys == [f"outdir-test/run/{k}" for k in ("f.png", "j.json", "sub/x.bin", "t.parquet", "t.txt")]
        head = s3.client().head_object(Bucket=BUCKET, Key="outdir-test/run/f.png")
        assert head["ContentType"] == "image/png"                     # a report on S3 opens in a browser
        assert split(uri + "/a") == (uri, "a")
        with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
            open_output("s3://no-such-bucket/x", s3.settings).makedirs()
        assert write_bytes(f"s3://{BUCKET}/single/file.bin", b"z", s3.settings) == f"s3://{BUCKET}/single/file.bin"
        assert read_bytes(f"s3://{BUCKET}/single/file.bin", s3.settings) == b"z"


# --------------------------------------------------------------------------------------------- contact sheets
def _tile(sheet: np.ndarray, i: int, size: int = 32, cols: int = 8) -> np.ndarray:
    r, c = divmod(i, cols)
    return sheet[r * size:(r + 1) * size, c * size:(c + 1) * size]


def test_contact_sheet_shows_webdataset_images_and_names_unreadable_ones(corpus, s3, tmp_path):
    from vitdecomp.query.retrieval import contact_sheet

    entries = corpus["entries"]
    uris = [e["uris"][2] for e in entries[:3]] + [e["uris"][3] for e in entries[3:]]    # local and S3 shards
    bad = [str(tmp_path / "gone.png"), f"{corpus['shards'][0]}#no_such_key"]
    (tmp_path / "junk.png").write_bytes(b"junk")
    bad.append(str(tmp_path / "junk.png"))
    for target in (str(tmp_path / "sheet.png"), f"s3://{BUCKET}/sheets/sheet.png"):
        path, failures = contact_sheet(uris + bad, target, size=32, s3=s3.settings)
        assert path == target
        sheet = np.asarray(Image.open(io.BytesIO(read_bytes(path, s3.settings))).convert("RGB"), np.float64)
        for i, e in enumerate(entries):
            got, want = _tile(sheet, i).reshape(-1, 3).mean(0), e["pixels"].reshape(-1, 3).mean(0)
            assert np.abs(got - want).max() < 8, (e["rel"], got, want)
        assert [u for u, _ in failures] == bad
        assert "FileNotFoundError" in failures[0][1] and "no image member" in failures[1][1]
        assert "UndecodableImageError" in failures[2][1]
        for i in range(len(entries), len(entries) + len(bad)):                  # grey, crossed out in red
            t = _tile(sheet, i)
            red = (t[..., 0] > 180) & (t[..., 1] < 60) & (t[..., 2] < 60)
            grey = (np.abs(t - 128) < 3).all(-1)
            assert red.mean() > 0.05 and grey.mean() > 0.5
            assert red[np.arange(32), np.arange(32)].mean() > 0.8                # the diagonal
    assert contact_sheet([], str(tmp_path / "none.png")) == (None, [])


def test_retrieve_on_a_webdataset_store_counts_unreadable_tiles(corpus, tmp_path):
    """query retrieve over a store whose URIs are shard members: the sheet shows the images, and an
    unreadable one is counted in the result, the report section's facts and a warning."""
    from vitdecomp.config import RetrieveConfig
    from vitdecomp.query.jobs import run_retrieve

    entries = corpus["entries"]
    comps = synthetic_components(blocks=2, heads=1)
    rng = np.random.default_rng(0)
    c = rng.normal(size=(len(entries) + 1, len(comps), 64)).astype(np.float32)
    uris = [e["uris"][2] for e in entries] + [f"{corpus['shards'][0]}#gone"]
    store = write_store(tmp_path / "store", c, comps, {"uri": uris})
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    logger = logging.getLogger("vitdecomp.query.jobs")
    logger.addHandler(handler)
    try:
        r = run_retrieve(RetrieveConfig(store=store, out=str(tmp_path / "r"), property="color", text="red color",
                                        top_components=2, top_images=len(uris), cache_dir=str(tmp_path / "cache")))
    finally:
        logger.removeHandler(handler)
    assert r["unreadable_tiles"] == [(uris[-1], r["unreadable_tiles"][0][1])]
    assert "no image member" in r["unreadable_tiles"][0][1]
    assert any("1 of 7 retrieved images could not be read" in h.getMessage() for h in seen)
    facts = json.loads((tmp_path / "r" / "retrieve.section.json").read_text())["facts"]
    assert facts["unreadable tiles"] == 1 and uris[-1] in facts["unreadable images"][0]
    sheet = np.asarray(Image.open(r["sheet"]).convert("RGB"), np.float64)
    order = r["table"].column("uri").to_pylist()
    for e in entries:
        got = _tile(sheet, order.index(e["uris"][2]), size=96).reshape(-1, 3).mean(0)
        assert np.abs(got - e["pixels"].reshape(-1, 3).mean(0)).max() < 8, e["rel"]
    assert "unreadable tiles" in (tmp_path / "r" / "report.html").read_text()


# --------------------------------------------------------------------------------------------- jobs on S3
def _s3_files(s3, prefix: str) -> dict[str, bytes]:
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_files(local: dict, remote: dict, volatile: str = "") -> None:
    """The same relative names (Lance datasets: same top-level folder, file names are random)."""
    fixed = lambda d: sorted(k for k in d if not (volatile and k.startswith(volatile)))    # noqa: E731
    assert fixed(local) == fixed(remote)
    if volatile:
        assert any(k.startswith(volatile) for k in local) and any(k.startswith(volatile) for k in remote)


def _embedded_images(page: str) -> dict[str, bytes]:
    """report.html: linked file name → the bytes of its embedded data: URI."""
    found = re.findall(r'<a class="plot" href="([^"]+)"><img src="data:image/png;base64,([^"]+)"', page)
    return {urllib.parse.unquote(h): base64.b64decode(b) for h, b in found}


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    """A planted CLIP store (toy CLIP space, 40 images) with per-head components; no Ray."""
    root = tmp_path_factory.mktemp("ioclip")
    comps = synthetic_components(blocks=3, heads=2)
    c = np.random.default_rng(1).normal(size=(40, len(comps), 64)).astype(np.float32)
    path = write_store(root / "store", c, comps, {"label": ["a", "b"] * 20})
    props = root / "props.yaml"
    props.write_text("redness: [red color, crimson]\nscene: [ocean, forest]\n")
    pool = root / "pool.txt"
    pool.write_text("a red circle\na blue square\na green cross\na shape on ocean\na striped triangle\n")
    return {"path": path, "props": str(props), "pool": str(pool), "cache": str(root / "cache")}


@pytest.mark.slow
def test_query_jobs_write_to_s3_as_they_do_locally(clip_store, s3, tmp_path):
    from vitdecomp.cli import main

    def run(out: str) -> None:
        common = ["--store", clip_store["path"], "--out", out, "--s3-endpoint", s3.endpoint,
                  "--cache-dir", clip_store["cache"], "--properties", clip_store["props"]]
        assert main(["query", "compattribute", *common, "--no-distributed"]) == 0
        assert main(["query", "retrieve", *common, "--property", "scene", "--image-ids", "img00000",
                     "--top-images", "5", "--index", "lance", "--nprobes", "8"]) == 0
        assert main(["query", "report", "--out", out, "--s3-endpoint", s3.endpoint, "--title", "io"]) == 0

    run(str(tmp_path / "q"))
    run(f"s3://{BUCKET}/query/q")
    local, remote = _local_files(tmp_path / "q"), _s3_files(s3, "query/q")
    _same_files(local, remote, volatile="retrieval_index.lance/")
    assert {"compattribute.parquet", "compattribute.png", "compattribute.json", "compattribute.section.json",
            "retrieval.parquet", "retrieval_components.parquet", "retrieval.png", "retrieve.section.json",
            "report.html"} <= set(remote)
    for name in ("compattribute.parquet", "retrieval_components.parquet"):
        assert pq.read_table(io.BytesIO(remote[name])).equals(pq.read_table(io.BytesIO(local[name]))), name
    hits = [pq.read_table(io.BytesIO(d[name])).to_pydict() for d in (local, remote) for name in ["retrieval.parquet"]]
    assert hits[0]["image_id"] == hits[1]["image_id"]
    np.testing.assert_allclose(hits[0]["score"], hits[1]["score"], atol=1e-6)
    # the report on S3 embeds every plot: the data: URIs hold exactly the PNG objects next to it
    page = remote["report.html"].decode("utf-8")
    embedded = _embedded_images(page)
    assert set(embedded) == {"compattribute.png", "retrieval.png"}
    for name, data in embedded.items():
        assert data == remote[name], name
    assert f"s3://{BUCKET}/query/q" in page and "<title>io</title>" in page
    # the planted store's URIs do not exist: the sheet crosses them out and says so
    facts = json.loads(remote["retrieve.section.json"])["facts"]
    assert facts["unreadable tiles"] == 5


@pytest.mark.slow
def test_fit_jobs_write_to_s3_as_they_do_locally(ray_local, clip_store, s3, tmp_path):
    """fit compalign and fit textspan (through an aligner read back from S3) with --out s3://."""
    from jobutil import make_images
    from vitdecomp.cli import main
    from vitdecomp.config import DecomposeConfig
    from vitdecomp.fit import Aligner
    from vitdecomp.pipeline import run_decompose
    from vitdecomp.toyworld.registry import TOY_CLIP, TOY_VIT

    make_images(tmp_path / "imgs", n=16, corrupt=False)
    store = str(tmp_path / "vit")
    run_decompose(DecomposeConfig(input=str(tmp_path / "imgs"), output=store, model=TOY_VIT, teacher=TOY_CLIP,
                                  batch_size=8, commit_every=8, dtype="fp32"))
    ep = ["--s3-endpoint", s3.endpoint]
    for out in (str(tmp_path / "fit"), f"s3://{BUCKET}/fit/run"):
        assert main(["fit", "compalign", "--store", store, "--out", f"{out}/align", "--max-epochs", "2", *ep]) == 0
        assert main(["fit", "textspan", "--store", store, "--out", f"{out}/ts", "--aligner", f"{out}/align",
                     "--pool", clip_store["pool"], "--texts-per-head", "2", "--rank", "4", "--last-layers", "1",
                     "--no-distributed", "--cache-dir", clip_store["cache"], *ep]) == 0
        assert main(["fit", "textspan", "--store", clip_store["path"], "--out", f"{out}/ts-clip", "--no-distributed",
                     "--pool", clip_store["pool"], "--texts-per-head", "2", "--rank", "4",
                     "--cache-dir", clip_store["cache"], *ep]) == 0
    local, remote = _local_files(tmp_path / "fit"), _s3_files(s3, "fit/run")
    _same_files(local, remote)
    assert {"align.safetensors", "align.json", "ts/textspan.parquet", "ts/textspan.txt", "ts/textspan.json",
            "ts-clip/textspan.parquet"} <= set(remote)
    a_local = Aligner.load(str(tmp_path / "fit" / "align"))
    a_s3 = Aligner.load(f"s3://{BUCKET}/fit/run/align.safetensors", s3.settings)
    assert a_local.names == a_s3.names and np.array_equal(a_local.maps.numpy(), a_s3.maps.numpy())
    for name in ("ts/textspan.parquet", "ts-clip/textspan.parquet"):
        assert pq.read_table(io.BytesIO(remote[name])).equals(pq.read_table(io.BytesIO(local[name]))), name
    with pytest.raises(InputError, match="no CompAlign artefact"):
        Aligner.load(f"s3://{BUCKET}/fit/run/nothing", s3.settings)
