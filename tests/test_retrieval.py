"""Image-based retrieval by property: planted groups come back, the Lance index agrees with the exact scan."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import vitdecomp as vd
from jobutil import synthetic_components, write_store
from vitdecomp.query.compattribute import basis
from vitdecomp.errors import InputError
from vitdecomp.config import RetrieveConfig
from vitdecomp.query.jobs import run_retrieve
from vitdecomp.query.retrieval import specific_rank
from vitdecomp.fit.text import encode_texts
from vitdecomp.toyworld.registry import TOY_CLIP


def test_specific_rank_formula():
    v = np.array([[0.9, 0.2, -0.1], [0.5, 0.6, 0.0], [0.3, -0.2, -0.4]])
    # v_i − max(0, max_{j≠i} v_j), written out per row for property 0
    assert specific_rank(v, 0).tolist() == pytest.approx([0.9 - 0.2, 0.5 - 0.6, 0.3 - 0.0])
    assert specific_rank(v[:, :1], 0).tolist() == pytest.approx([0.9, 0.5, 0.3])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """blocks.0.mlp points along 'water' (+) or against it (−) by the image's scene; the rest is noise."""
    root = tmp_path_factory.mktemp("retr")
    torch.manual_seed(0)
    u = basis(encode_texts(vd.load_model(TOY_CLIP), ["water"]))[0]
    rng = np.random.default_rng(3)
    comps = synthetic_components()
    names = [c.name for c in comps]
    n = 300
    scene = rng.integers(0, 2, n)
    c = 0.05 * rng.normal(size=(n, len(comps), 64))
    c[:, names.index("blocks.0.mlp")] += np.outer(np.where(scene == 1, 1.5, -1.5) + 0.1 * rng.normal(size=n), u)
    props = root / "props.yaml"
    props.write_text(yaml.safe_dump({"scenery": ["water"]}))
    path = write_store(root / "s", c.astype(np.float32), comps, {"scene": [("land", "water")[s] for s in scene]})
    return {"path": path, "scene": scene, "props": str(props), "ids": [f"img{i:05d}" for i in range(n)]}


def test_probe_image_brings_back_its_planted_group(store, tmp_path):
    probe = store["ids"][int(np.flatnonzero(store["scene"] == 1)[0])]
    r = run_retrieve(RetrieveConfig(store=store["path"], out=str(tmp_path / "r"), property="scenery",
                                 image_ids=[probe], properties=store["props"], top_components=1, top_images=50))
    assert r["components"] == ["blocks.0.mlp"] and r["search"] == "exact"
    got = r["table"].to_pylist()
    assert len(got) == 50 and probe not in {x["image_id"] for x in got}
    idx = [store["ids"].index(x["image_id"]) for x in got]
    assert all(store["scene"][i] == 1 for i in idx)                       # all from the probe's group
    assert [x["score"] for x in got] == sorted([x["score"] for x in got], reverse=True) and got[-1]["score"] > 0.9
    comp = pq.read_table(tmp_path / "r" / "retrieval_components.parquet").to_pylist()
    assert comp[0]["component"] == "blocks.0.mlp"
    # independent: cosine of the stored blocks.0.mlp vectors
    st = vd.open_store(store["path"])
    v = {b: x for bt in st.iter_batches(components=["blocks.0.mlp"]) for b, x in zip(bt.ids, bt.contributions[:, 0])}
    unit = lambda x: x / np.linalg.norm(x)                                    # noqa: E731
    assert got[0]["score"] == pytest.approx(float(unit(v[got[0]["image_id"]]) @ unit(v[probe])), abs=1e-5)
    # the Lance IVF index (all partitions probed) returns the same neighbours
    r2 = run_retrieve(RetrieveConfig(store=store["path"], out=str(tmp_path / "r2"), property="scenery",
                                  image_ids=[probe], properties=store["props"], top_components=1, top_images=50,
                                  index="lance", nprobes=64))
    assert r2["search"].startswith("lance") and (tmp_path / "r2" / "retrieval_index.lance").exists()
    a, b = r["table"].to_pylist(), r2["table"].to_pylist()
    assert [x["image_id"] for x in a] == [x["image_id"] for x in b]
    np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-5)
    assert (tmp_path / "r2" / "report.html").exists()


def test_retrieval_bad_probes(store, tmp_path):
    base = dict(store=store["path"], out=str(tmp_path / "e"), property="scenery", properties=store["props"])
    with pytest.raises(InputError, match="exactly one probe"):
        run_retrieve(RetrieveConfig(**base))
    with pytest.raises(InputError, match="exactly one probe"):
        run_retrieve(RetrieveConfig(text="water", image_ids=["img00001"], **base))
    with pytest.raises(InputError, match=r"probe image ids \['img9'\] are not in"):
        run_retrieve(RetrieveConfig(image_ids=["img9"], **base))
    with pytest.raises(InputError, match="index: must be one of"):
        run_retrieve(RetrieveConfig(image_ids=["img00001"], index="faiss", **base))
