"""The store API without Ray: Manifest (typed, exact JSON round trip), Store.create and Store.append,
and their equivalence with what the decompose job writes."""
from __future__ import annotations

import dataclasses
import io
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from jobutil import make_images, synthetic_components
from vitdecomp.config import DecomposeConfig, DecomposeOptions
from vitdecomp.store import Manifest, Store, StoreError, manifest_hash, open_store
from vitdecomp.store.manifest import manifest_diff

MODEL = "timm:deit_tiny_patch16_224"
D = 8


@pytest.fixture(scope="module")
def arch():
    """The tiny model's architecture (no weights needed to build a manifest)."""
    return vd.load_model(MODEL, load_weights=False)


def planted_manifest(arch, comps, fmt: str, passthrough=None) -> Manifest:
    m = Manifest.build(arch, comps, DecomposeOptions(dtype="fp32"), format=fmt, passthrough=passthrough or {})
    return dataclasses.replace(m, d=D, model=dataclasses.replace(m.model, readout={**m.model.readout, "dim": D}))


def chunk(comps, n: int, seed: int):
    c = np.random.default_rng(seed).normal(size=(n, len(comps), D)).astype(np.float32)
    return SimpleNamespace(names=[x.name for x in comps], contributions=torch.from_numpy(c),
                           readout=torch.from_numpy(c.sum(1))), c


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_create_append_read_back(tmp_path, arch, fmt):
    comps = synthetic_components(blocks=2, heads=2)
    m = planted_manifest(arch, comps, fmt, {"label": pa.string(), "score": pa.float64()})
    st = Store.create(tmp_path / "s", m)
    assert st.count() == 0 and st.names == m.names and st.typed_manifest == m
    assert (tmp_path / "s" / "manifest.json").read_text() == m.to_json()
    a, ca = chunk(comps, 5, 0)
    b, cb = chunk(comps, 3, 1)
    ids_a, ids_b = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(3)]
    assert st.append(a, ids_a, columns={"label": list("vwxyz"), "score": [0.5] * 5}) == 5
    assert st.append(b, ids_b, columns={"label": list("abc"), "score": [1.0, 2.0, 3.0]},
                     uris=[f"s3://bucket/{i}.png" for i in ids_b]) == 3
    st = open_store(str(tmp_path / "s"))
    assert st.count() == 8 and sorted(st.ids()) == sorted(ids_a + ids_b)
    rows = {i: k for k, i in enumerate(ids_a + ids_b)}
    want = np.concatenate([ca, cb])
    got = list(st.iter_batches(batch_size=100, columns=["label", "score"]))
    order = [rows[i] for bt in got for i in bt.ids]
    np.testing.assert_array_equal(np.concatenate([bt.contributions for bt in got]), want[order])
    np.testing.assert_allclose(np.concatenate([bt.readout for bt in got]), want[order].sum(1), rtol=0, atol=1e-6)
    labels = dict(zip(ids_a + ids_b, list("vwxyzabc")))
    assert [v for bt in got for v in bt.columns["label"].to_pylist()] == [labels[i] for bt in got for i in bt.ids]
    uris = dict(zip(*st.read(columns=["image_id", "uri"]).to_pydict().values()))
    assert uris["a0"] is None and uris["b2"] == "s3://bucket/b2.png"
    assert st.schema() == m.schema()

    # creating again with the same identity reopens it; a different manifest is refused
    again = Store.create(tmp_path / "s", dataclasses.replace(m, created="2000-01-01T00:00:00Z"))
    assert again.count() == 8
    with pytest.raises(StoreError, match=r"differs in \['dtype'\]"):
        Store.create(tmp_path / "s", dataclasses.replace(m, dtype="fp16"))


@pytest.mark.parametrize("fmt", ["lance", "parquet"])
def test_append_refuses_duplicates_wrong_names_and_wrong_d(tmp_path, arch, fmt):
    comps = synthetic_components(blocks=1, heads=2)
    st = Store.create(tmp_path / "s", planted_manifest(arch, comps, fmt))
    a, _ = chunk(comps, 4, 0)
    st.append(a, ["x0", "x1", "x2", "x3"])

    b, _ = chunk(comps, 3, 1)
    with pytest.raises(StoreError, match=r"repeats 1 image ids, e\.g\. \['y0'\]"):
        st.append(b, ["y0", "y1", "y0"])
    with pytest.raises(StoreError, match=r"2 of these image ids are already stored, e\.g\. \['x1', 'x3'\]"):
        st.append(b, ["x1", "new", "x3"])
    wrong = SimpleNamespace(names=[x.name for x in comps][::-1], contributions=b.contributions, readout=b.readout)
    with pytest.raises(StoreError, match="components differ from the store's.*another order"):
        st.append(wrong, ["z0", "z1", "z2"])
    renamed = SimpleNamespace(names=["embed", "blocks.0.attn.head.0", "blocks.0.attn.head.9", "blocks.0.mlp", "bias"],
                              contributions=b.contributions, readout=b.readout)
    with pytest.raises(StoreError, match=r"not in the store: \['blocks.0.attn.head.9'\]"):
        st.append(renamed, ["z0", "z1", "z2"])
    wide = SimpleNamespace(names=b.names, contributions=torch.zeros(3, len(comps), D + 1), readout=torch.zeros(3, D + 1))
    with pytest.raises(StoreError, match=rf"shape \[3, {len(comps)}, {D + 1}\].*d={D}"):
        st.append(wide, ["z0", "z1", "z2"])
    with pytest.raises(StoreError, match="pass-through columns"):
        st.append(b, ["z0", "z1", "z2"], columns={"label": ["a", "b", "c"]})
    with pytest.raises(StoreError, match="convention='uniform'"):
        st.append(SimpleNamespace(**vars(b), convention="uniform"), ["z0", "z1", "z2"])
    st = open_store(str(tmp_path / "s"))
    assert sorted(st.ids()) == ["x0", "x1", "x2", "x3"]                # nothing of a refused chunk is visible


def test_manifest_json_round_trip_is_exact(arch):
    comps = synthetic_components(blocks=1, heads=2)
    m = Manifest.build(arch, comps, DecomposeOptions(blocks="0", heads=True, dtype="fp16"), format="parquet",
                       passthrough={"label": pa.string()}, source_kind="table", seed=7)
    d = m.to_dict()
    assert d["model"]["seed"] == 7 and d["options"]["blocks"] == [0] and d["passthrough"] == ["label:string"]
    assert Manifest.from_json(m.to_json()) == m and Manifest.from_json(m.to_json()).to_json() == m.to_json()
    assert manifest_hash(m) == manifest_hash(d) and manifest_diff(m, d) == []
    assert m["model"]["name"] == MODEL and m.get("teacher") is None and m.names == [c.name for c in comps]

    # a teacher, weights from a checkpoint (no seed), an older manifest without provenance, unknown keys
    old = {**d, "teacher": {"name": "open_clip:ViT-S-16", "dim": 384, "pretrained": None, "checkpoint": "w.pt",
                            "checkpoint_sha256": "ab" * 32},
           "model": {**{k: v for k, v in d["model"].items() if k != "seed"}, "pretrained": "augreg", "future": 1},
           "teacher_preprocess": {"input_size": [3, 224, 224]}, "passthrough": None, "from_the_future": {"x": [1]}}
    for k in ("source", "package", "created"):
        del old[k]
    text = json.dumps(old, indent=2, sort_keys=True)
    back = Manifest.from_json(text)
    assert back.to_dict() == old and back.to_json() == text
    assert back.teacher.dim == 384 and back.model.seed is None and back.created is None
    assert back.extra == {"from_the_future": {"x": [1]}} and back.model.extra == {"future": 1}


@pytest.mark.parametrize("fmt", ["lance"])
def test_store_api_equals_decompose_job(ray_local, tmp_path, fmt):
    """The job's manifest is Manifest.build's, and a store written in-process from vd.decompose
    holds exactly the job's rows (fp32)."""
    from vitdecomp.pipeline import run_decompose

    root = tmp_path / "images"
    root.mkdir()
    valid = make_images(root, n=4, corrupt=False)
    cfg = DecomposeConfig(model=MODEL, input=str(root), output=str(tmp_path / "job"), format=fmt, dtype="fp32",
                          blocks="10-11", label_from_folder=True, batch_size=1, commit_every=3)
    s = run_decompose(cfg)
    assert s.written == len(valid)
    job = open_store(cfg.output)
    raw = (tmp_path / "job" / "manifest.json").read_text()
    jm = Manifest.from_json(raw)
    assert jm.to_json() == raw

    lm = vd.load_model(MODEL)                        # random init, seed 0 (as the job's workers)
    from vitdecomp.store.compact import build_manifest

    m, basis = build_manifest(lm, None, cfg, layout=cfg.layout, format=fmt, passthrough={"label": pa.string()},
                              source_kind="folder", created=jm.created)   # the default layout: compact
    assert m == jm and m.to_json() == raw and jm.layout == "compact"

    t = job.read(columns=["image_id", "uri", "label"]).sort_by("image_id")
    ids = t.column("image_id").to_pylist()
    api = Store.create(tmp_path / "api", m, basis=basis)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # as the job's actors (one CPU each), one image per batch
    try:
        for k, i in enumerate(ids):
            x = lm.transform(Image.open(io.BytesIO(valid[i])).convert("RGB"))[None]
            api.append(vd.decompose(lm, x, blocks=[10, 11]), [i], columns={"label": t.column("label")[k:k + 1]},
                       uris=[t.column("uri")[k].as_py()])
    finally:
        torch.set_num_threads(threads)
    a, b = api.read().sort_by("image_id"), job.read().sort_by("image_id")
    assert a.schema == b.schema and a.column_names == b.column_names
    for name in a.column_names:
        assert a.column(name).equals(b.column(name)), name
