"""The explorer (vitdecomp.serve) through Flask's test client, on a toy-world CLIP store built in-process
with the Store API, with real fit and query outputs next to it. Values are checked against the
library's own jobs (query retrieve, query heatmap) and independent computations."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from PIL import Image

import vitdecomp as vd
from vitdecomp.config import ServeConfig

# ------------------------------------------------------------------------------------------ the world
SERVE_PROPERTIES = {
    "world color": ["red color", "yellow color", "green color", "cyan color", "blue color", "pink color"],
    "world background": ["a shape on ocean", "a shape on lake", "a shape on forest", "a shape on desert"],
    "world shape": ["a circle", "a square", "a triangle", "a cross"],
}


def build_world(root: Path, n_train: int = 16, n_val: int = 12, n_test: int = 12, fmt: str = "lance") -> dict:
    """A toy world, the toy CLIP's store of it (random init, seed 0; written with the Store API, no Ray),
    and real outputs of fit textspan, query compattribute / mitigate / ablate / interpretability."""
    from vitdecomp.config import (AblateConfig, CompAttributeConfig, DecomposeOptions, InterpretabilityConfig,
                                  MitigateConfig, TextSpanConfig)
    from vitdecomp.fit.jobs import run_textspan
    from vitdecomp.io import read_image
    from vitdecomp.query.jobs import run_ablate, run_compattribute, run_interpretability, run_mitigate
    from vitdecomp.store import Manifest, Store
    from vitdecomp.toyworld.generate import WorldConfig, generate, load_metadata, vocabulary_pool
    from vitdecomp.toyworld.registry import TOY_CLIP

    root.mkdir(parents=True, exist_ok=True)
    wcfg = WorldConfig(seed=5, n_train=n_train, n_val=n_val, n_test=n_test)
    generate(str(root / "world"), wcfg)
    rows = load_metadata(str(root / "world")).to_pylist()
    # the random-init toy CLIP saved as a checkpoint, as the demo's trained one: text embeddings of a
    # checkpoint are cached on disk (those of a random-init tower are not), which keeps the test short
    from safetensors.torch import save_file

    ck = str(root / "toy-clip.safetensors")
    save_file({k: v.contiguous() for k, v in vd.load_model(TOY_CLIP).model.state_dict().items()}, ck)
    lm = vd.load_model(TOY_CLIP, checkpoint=ck)
    cols = ("label_name", "background", "split", "scene")
    m = Manifest.build(lm, options=DecomposeOptions(dtype="fp32"), format=fmt,
                       passthrough={c: pa.string() for c in cols})
    store = str(root / "store")
    st = Store.create(store, m)
    for s in range(0, len(rows), 16):
        chunk = rows[s:s + 16]
        x = torch.stack([lm.transform(read_image(r["uri"])) for r in chunk])
        st.append(vd.decompose(lm, x), [r["image_id"] for r in chunk],
                  columns={c: [str(r[c]) for r in chunk] for c in cols}, uris=[r["uri"] for r in chunk])
    props = root / "properties.yaml"
    props.write_text(yaml.safe_dump(SERVE_PROPERTIES))
    pool = root / "pool.txt"
    pool.write_text("\n".join(vocabulary_pool()[::3]))          # a third of it keeps the test short
    cache = str(root / "text-cache")
    fit, q = str(root / "fit"), str(root / "query")
    text = dict(cache_dir=cache, clip_checkpoint=ck)
    run_textspan(TextSpanConfig(store=store, out=fit, pool=str(pool), texts_per_head=4, rank=16, last_layers=2,
                                distributed=False, **text))
    run_compattribute(CompAttributeConfig(store=store, out=q, properties=str(props), distributed=False, **text))
    run_mitigate(MitigateConfig(store=store, out=q, label_column="label_name", group_column="background",
                                split_column="split", fit_split=["val"], eval_split=["test"], k=3, random_draws=1,
                                spurious="world background", core="world color", properties=str(props), **text))
    run_ablate(AblateConfig(store=store, out=q, label_column="scene", split_column="split", eval_split=["test"],
                            **text))
    run_interpretability(InterpretabilityConfig(textspan=fit, out=q, properties=str(props)))
    return {"root": root, "store": store, "checkpoint": ck, "fit": fit, "query": q, "props": str(props), "cache": cache,
            "ids": [r["image_id"] for r in rows], "rows": rows}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve"))


def serve_config(w: dict, **kw) -> ServeConfig:
    base = dict(store=w["store"], fit=w["fit"], query=w["query"], properties=w["props"], cache_dir=w["cache"],
                checkpoint=w["checkpoint"],
                index_cache=str(Path(w["root"]) / "index-cache"), top_images=8, top_components=3)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def app(world):
    from vitdecomp.serve import build

    ex, app = build(serve_config(world))
    app.config["TESTING"] = True
    return ex, app.test_client()


def hits_of(html: str, grid_id: str) -> list[tuple[str, float]]:
    """(image_id, score) of a result grid, in page order."""
    i = html.index(f'id="{grid_id}"')
    j = html.find("</div>", i)
    import html as H

    return [(H.unescape(a), float(b)) for a, b in
            re.findall(r'data-image-id="([^"]*)" data-score="([^"]*)"', html[i:j])]


# ------------------------------------------------------------------------------------------ tests
def test_overview_lists_what_is_there_and_what_is_missing(world, tmp_path):
    from vitdecomp.serve import build

    _, app = build(serve_config(world))
    html = app.test_client().get("/").get_data(as_text=True)
    assert "vitdecomp-toy-clip" in html and f'id="rows">{len(world["ids"])}<' in html
    assert "exact scan" in html and 'id="missing"' not in html          # everything present
    # no fit and an empty query directory: each missing output names the command that makes it
    _, bare = build(serve_config(world, fit=None, query=str(tmp_path / "empty")))
    html = bare.test_client().get("/").get_data(as_text=True)
    assert "vitdecomp fit textspan --store" in html and "vitdecomp query compattribute --store" in html
    assert "vitdecomp query mitigate" in html
    c = bare.test_client()
    assert "Compute them now" in c.get("/components").get_data(as_text=True)
    assert 'id="no-robustness"' in c.get("/robustness").get_data(as_text=True)
    assert 'id="no-interpretability"' in c.get("/interpretability").get_data(as_text=True)
    # computed on demand: the same scores as the query's table
    got = c.get("/components?compute=1").get_data(as_text=True)
    ref = app.test_client().get("/components").get_data(as_text=True)
    cells = lambda h: re.findall(r'data-component="([^"]+)" data-property="([^"]+)" data-score="([^"]+)"', h)  # noqa
    a, b = cells(got), cells(ref)
    assert len(a) == len(b) > 0 and [x[:2] for x in a] == [x[:2] for x in b]
    np.testing.assert_allclose([float(x[2]) for x in a], [float(x[2]) for x in b], atol=1e-5)


def test_components_heatmap_matches_the_compattribute_table(app, world):
    import pyarrow.parquet as pq

    _, c = app
    html = c.get("/components").get_data(as_text=True)
    t = pq.read_table(os.path.join(world["query"], "compattribute.parquet")).to_pylist()
    want = {(r["component"], r["property"]): r["score"] for r in t if r["property"] in SERVE_PROPERTIES}
    cells = re.findall(r'data-component="([^"]+)" data-property="([^"]+)" data-score="([^"]+)"', html)
    got = {(a, b): float(s) for a, b, s in cells if b in SERVE_PROPERTIES}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-6 for k in want)


def test_component_page_top_images_texts_and_effect(app, world):
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.toyworld.registry import TOY_CLIP

    ex, c = app
    head = next(iter(ex.textspan))
    html = c.get(f"/component?name={head}&property=world+color&k=5").get_data(as_text=True)
    assert 'id="textspan"' in html and ex.textspan[head][0]["text"] in html
    top = hits_of(html, "top-images")
    bottom = hits_of(html, "bottom-images")
    # independent: unit mean of the property's description embeddings, every stored contribution projected
    clip = vd.load_model(TOY_CLIP, checkpoint=world["checkpoint"])
    u = encode_texts(clip, SERVE_PROPERTIES["world color"], cache_dir=world["cache"]).mean(0)
    u = u / np.linalg.norm(u)
    st = vd.open_store(world["store"])
    s = {i: float(v @ u) for b in st.iter_batches(components=[head]) for i, v in zip(b.ids, b.contributions[:, 0])}
    order = sorted(s, key=lambda i: -s[i])
    assert [h[0] for h in top] == order[:5] and [h[0] for h in bottom] == order[::-1][:5]
    assert top[0][1] == pytest.approx(s[order[0]], abs=1e-5)
    # a mitigation-ablated component shows its ablation effect
    m = ex.mitigation("mitigation")
    ablated = next(r["component"] for r in m["components"] if r["ablated"])
    html = c.get(f"/component?name={ablated}").get_data(as_text=True)
    assert 'id="effects"' in html and "; ablated" in html


def test_property_neighbours_equal_query_retrieve(app, world, tmp_path):
    from vitdecomp.config import RetrieveConfig
    from vitdecomp.query.jobs import run_retrieve

    _, c = app
    probe = world["ids"][3]
    html = c.get(f"/neighbours?image_id={probe}&property=world+background&top_components=3&k=8").get_data(as_text=True)
    got = hits_of(html, "results")
    r = run_retrieve(RetrieveConfig(store=world["store"], out=str(tmp_path / "r"), property="world background",
                                    image_ids=[probe], properties=world["props"], top_components=3, top_images=8,
                                    cache_dir=world["cache"], clip_checkpoint=world["checkpoint"]))
    assert [g[0] for g in got] == r["ids"]
    np.testing.assert_allclose([g[1] for g in got], r["scores"], atol=1e-5)
    for comp in r["components"]:
        assert f">{comp}</a>" in html


def test_upload_is_decomposed_on_the_fly_and_checked(app, world):
    ex, c = app
    row = world["rows"][5]
    data = Path(row["uri"]).read_bytes()
    r = c.post("/neighbours", data={"property": "world background", "top_components": "3", "k": "8",
                                    "upload": (io.BytesIO(data), "x.png")}, content_type="multipart/form-data")
    html = r.get_data(as_text=True)
    assert r.status_code == 200, html
    got = hits_of(html, "results")
    # the upload is the store's image 5: its nearest neighbour is itself (cosine 1), then the store's ranking
    assert got[0][0] == row["image_id"] and got[0][1] == pytest.approx(1.0, abs=1e-4)
    by_id = c.get(f"/neighbours?image_id={row['image_id']}&property=world+background&top_components=3&k=7")
    assert [g[0] for g in got[1:]] == [g[0] for g in hits_of(by_id.get_data(as_text=True), "results")]
    assert 'id="upload-preview"' in html and "data:image/png;base64," in html
    # not an image, too large, a decompression bomb: clear errors, nothing written into the store
    before = sorted(os.listdir(world["store"]))
    bad = c.post("/neighbours", data={"upload": (io.BytesIO(b"not an image"), "x.png")},
                 content_type="multipart/form-data")
    assert bad.status_code == 400 and "not a supported image" in bad.get_data(as_text=True).lower()
    big = c.post("/neighbours", data={"upload": (io.BytesIO(b"0" * (ex.cfg.max_upload_bytes + 100_000)), "x.png")},
                 content_type="multipart/form-data")
    assert big.status_code == 413 and "--max-upload-bytes" in big.get_data(as_text=True)
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    bomb = c.post("/neighbours", data={"upload": (io.BytesIO(buf.getvalue()), "b.png")},
                  content_type="multipart/form-data")
    assert bomb.status_code == 400 and "over the limit" in bomb.get_data(as_text=True)
    assert sorted(os.listdir(world["store"])) == before


def test_per_head_neighbours_of_an_image_and_a_text(app, world):
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.toyworld.registry import TOY_CLIP

    ex, c = app
    layer = [x for x in ex.head_choices() if not re.search(r"\.head\.\d+$", x)][-1]
    heads = [n for n in ex.names if n.startswith(layer + ".head.")]
    probe = world["ids"][0]
    html = c.get(f"/heads?component={layer}&image_id={probe}&text=a+red+circle&k=5").get_data(as_text=True)
    img, txt = hits_of(html, "image-results"), hits_of(html, "text-results")
    st = vd.open_store(world["store"])
    vec = {i: v.sum(0) for b in st.iter_batches(components=heads) for i, v in zip(b.ids, b.contributions)}
    unit = lambda x: x / np.linalg.norm(x)                                       # noqa: E731
    cos = {i: float(unit(v) @ unit(vec[probe])) for i, v in vec.items() if i != probe}
    assert [h[0] for h in img] == sorted(cos, key=lambda i: -cos[i])[:5]
    clip = vd.load_model(TOY_CLIP, checkpoint=world["checkpoint"])
    t = encode_texts(clip, ["a red circle"], cache_dir=world["cache"])[0]
    proj = {i: float(v @ t) for i, v in vec.items()}
    assert [h[0] for h in txt] == sorted(proj, key=lambda i: -proj[i])[:5]
    assert txt[0][1] == pytest.approx(proj[txt[0][0]], abs=1e-5)


def test_segmentation_png_equals_query_heatmap(app, world, tmp_path):
    from vitdecomp.config import HeatmapConfig
    from vitdecomp.query.heatmap_job import run_heatmap

    ex, c = app
    layer = [x for x in ex.head_choices() if not re.search(r"\.head\.\d+$", x)][-1]
    iid = world["ids"][2]
    r = c.get(f"/segmentation.png?image_id={iid}&component={layer}&text=a+red+circle")
    assert r.status_code == 200 and r.mimetype == "image/png"
    job = run_heatmap(HeatmapConfig(store=world["store"], out=str(tmp_path / "h"), image_ids=[iid],
                                    components=[layer], text="a red circle", cache_dir=world["cache"],
                                    checkpoint=world["checkpoint"], clip_checkpoint=world["checkpoint"]))
    want = np.asarray(Image.open(job["pngs"][0]).convert("RGB"))
    got = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"))
    assert got.shape == want.shape and np.array_equal(got, want)
    _, m1 = ex.segmentation(iid, layer, ["a red circle"])
    np.testing.assert_allclose(m1, job["maps"][0], rtol=1e-6, atol=1e-9)
    # contrastive: the map of text1 − text2 is the difference of the two maps (linear in the direction)
    _, m2 = ex.segmentation(iid, layer, ["a blue square"])
    _, md = ex.segmentation(iid, layer, ["a red circle", "a blue square"])
    np.testing.assert_allclose(md, m1 - m2, rtol=0, atol=1e-5 * np.abs(m1).max())
    page = c.get(f"/segmentation?image_id={iid}&component={layer}&text=a&text2=b").get_data(as_text=True)
    assert 'id="seg-image"' in page


def test_robustness_and_interpretability_pages_show_the_query_numbers(app, world):
    import json

    _, c = app
    html = c.get("/robustness").get_data(as_text=True)
    s = json.load(open(os.path.join(world["query"], "mitigation.json")))
    bars = re.findall(r'data-group="([^"]+)" data-series="(before|after)" data-value="([^"]+)"', html)
    import html as H

    got = {(H.unescape(g), k): float(v) for g, k, v in bars}
    for k in ("before", "after"):
        for g, v in s["groups"][k].items():
            assert got[(g, k)] == pytest.approx(v, abs=1e-6)
    for comp in s["ablated"]:
        assert f'class="ablated" href="/component?name={comp}"' in html
    assert f'{s["worst_group"]["before"]:.4f}' in html and 'id="ablation"' in html
    html = c.get("/interpretability").get_data(as_text=True)
    i = json.load(open(os.path.join(world["query"], "interpretability.json")))
    assert f'{i["association_score"]:.4f}' in html and f'{i["entanglement_score"]:.4f}' in html


def test_images_only_by_store_id_and_strings_escaped(app, world, tmp_path):
    ex, c = app
    r = c.get(f"/image?id={world['ids'][0]}")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.data)).size[0] <= 128
    for bad in ("/etc/passwd", "../world/images/train/00000.png", world["rows"][0]["uri"], ""):
        assert c.get("/image", query_string={"id": bad}).status_code == 404
    hostile = '<script>alert("x")</script>'
    html = c.get("/heads", query_string={"image_id": hostile, "component": hostile}).get_data(as_text=True)
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    html = c.get("/neighbours", query_string={"image_id": hostile}).get_data(as_text=True)
    assert "<script>alert" not in html
    # a request for another host name (DNS rebinding) is refused; every page is served with a CSP
    assert c.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert "default-src 'self'" in c.get("/").headers["Content-Security-Policy"]
    # no page refers to another host
    for p in ("/", "/components", "/heads", "/neighbours", "/segmentation", "/robustness", "/interpretability"):
        assert not re.search(r'(src|href)="(https?:)?//', c.get(p).get_data(as_text=True)), p


def test_model_that_cannot_be_rebuilt_disables_decomposition(world, tmp_path):
    import json
    import shutil

    from vitdecomp.serve import build

    bad = tmp_path / "store"
    shutil.copytree(world["store"], bad)
    mf = json.loads((bad / "manifest.json").read_text())
    mf["model"]["checkpoint"] = "/gone/weights.safetensors"
    (bad / "manifest.json").write_text(json.dumps(mf))
    gone = tmp_path / "gone.safetensors"            # the checkpoint was moved away: the model cannot be rebuilt
    ex, app = build(serve_config(world, store=str(bad), index_cache=str(tmp_path / "ic"), checkpoint=str(gone)))
    c = app.test_client()
    html = c.get("/neighbours").get_data(as_text=True)
    assert 'id="upload-disabled"' in html and "cannot be rebuilt" in html and "disabled" in html
    assert "--checkpoint" in c.get("/").get_data(as_text=True)
    # what needs no model still works: stored neighbours
    got = hits_of(c.get(f"/neighbours?image_id={world['ids'][1]}&property=world+color").get_data(as_text=True),
                  "results")
    assert len(got) == 8


def test_vector_index_above_the_threshold_is_cached_by_store_version(world, tmp_path):
    from vitdecomp.serve import build
    from vitdecomp.serve.data import store_version

    cache = tmp_path / "ic"
    # nprobes ≥ the number of IVF partitions (√n): every partition is searched, so the answer is exact
    ex, app = build(serve_config(world, index_threshold=10, index_cache=str(cache), nprobes=64))
    c = app.test_client()
    probe = world["ids"][4]
    html = c.get(f"/neighbours?image_id={probe}&property=world+background&top_components=3&k=8").get_data(as_text=True)
    assert "Lance IVF_FLAT index" in html
    ver = store_version(ex.st)
    built = list((cache / ver).glob("index-*.lance.done"))
    assert len(built) == 1
    t0 = built[0].stat().st_mtime
    ex2, app2 = build(serve_config(world, index_threshold=10, index_cache=str(cache), nprobes=64))
    html2 = app2.test_client().get(f"/neighbours?image_id={probe}&property=world+background&top_components=3&k=8")
    assert built[0].stat().st_mtime == t0                            # reused, not rebuilt
    exact = build(serve_config(world))[1].test_client().get(
        f"/neighbours?image_id={probe}&property=world+background&top_components=3&k=8").get_data(as_text=True)
    # every IVF partition searched: the exact scan's answer
    assert [h[0] for h in hits_of(html2.get_data(as_text=True), "results")] == [h[0] for h in hits_of(exact, "results")]


def test_parquet_store_index_follows_the_store_version(tmp_path):
    """A Parquet store above the threshold: the indexed neighbours equal numpy's; new rows make a new
    store version, hence a new index that contains them."""
    from types import SimpleNamespace

    from jobutil import synthetic_components, write_store
    from vitdecomp.serve import build
    from vitdecomp.serve.data import store_version

    comps = synthetic_components()
    rng = np.random.default_rng(0)
    c = rng.normal(size=(300, len(comps), 16)).astype(np.float32)
    path = write_store(tmp_path / "s", c, comps, fmt="parquet")
    cfg = ServeConfig(store=path, index_threshold=100, index_cache=str(tmp_path / "ic"), top_images=5,
                      nprobes=64)                  # ≥ the √300 IVF partitions: an exhaustive, exact search
    ex, app = build(cfg)
    v0 = store_version(ex.st)
    assert v0.startswith("parquet-1-")
    html = app.test_client().get("/heads?component=blocks.1.mlp&image_id=img00007").get_data(as_text=True)
    assert "Lance IVF_FLAT index" in html
    k = [x.name for x in comps].index("blocks.1.mlp")
    unit = c[:, k] / np.linalg.norm(c[:, k], axis=1, keepdims=True)
    cos = unit @ unit[7]
    cos[7] = -np.inf
    want = [f"img{i:05d}" for i in np.argsort(-cos)[:5]]
    assert [h[0] for h in hits_of(html, "image-results")] == want
    # new rows: a new version and a new index that finds them
    st = vd.open_store(path)
    new = c[:1].copy()
    new[0, k] = c[7, k] * 2.0                                  # same direction as the probe: cosine 1
    st.append(SimpleNamespace(names=[x.name for x in comps], contributions=new, readout=new.sum(1)), ["twin"])
    ex2, app2 = build(cfg)
    assert store_version(ex2.st) != v0
    html = app2.test_client().get("/heads?component=blocks.1.mlp&image_id=img00007").get_data(as_text=True)
    assert hits_of(html, "image-results")[0][0] == "twin"
    assert sorted(os.listdir(tmp_path / "ic")) == sorted([v0, store_version(ex2.st)])


@pytest.fixture(scope="module")
def aligned(world, tmp_path_factory):
    """The toy ViT classifier's store of the same images and a CompAlign aligner into the toy CLIP
    (random maps: the explorer must apply them exactly as the library does, whatever they are)."""
    from vitdecomp.config import DecomposeOptions
    from vitdecomp.fit.compalign import Aligner
    from vitdecomp.io import read_image
    from vitdecomp.store import Manifest, Store
    from vitdecomp.toyworld.registry import TOY_CLIP, TOY_VIT

    root = tmp_path_factory.mktemp("aligned")
    lm = vd.load_model(TOY_VIT)
    st = Store.create(str(root / "store"), Manifest.build(lm, options=DecomposeOptions(dtype="fp32")))
    rows = world["rows"]
    for s0 in range(0, len(rows), 16):
        chunk = rows[s0:s0 + 16]
        x = torch.stack([lm.transform(read_image(r["uri"])) for r in chunk])
        st.append(vd.decompose(lm, x), [r["image_id"] for r in chunk], uris=[r["uri"] for r in chunk])
    clip = vd.load_model(TOY_CLIP, checkpoint=world["checkpoint"])
    g = torch.Generator().manual_seed(0)
    K, d, d_t = len(st.names), st.manifest["d"], clip.readout.dim
    al = Aligner(list(st.names), 0.2 * torch.randn(K, d_t, d, generator=g), 0.05 * torch.randn(d_t, generator=g),
                 {"model": st.manifest["model"], "teacher": {"name": TOY_CLIP,
                                                             "checkpoint_sha256": clip.checkpoint_sha256}})
    path = al.save(str(root / "align"))
    return {"store": str(root / "store"), "aligner": path, "al": al, "clip": clip, "root": root}


def test_aligned_store_text_neighbours_upload_and_segmentation(world, aligned, tmp_path):
    """A non-CLIP store through its aligner: text neighbours = Σ_k (A_k c_k + b/K)·t by numpy; an upload of
    a store image finds itself; the segmentation map = query heatmap's with the aligner."""
    from vitdecomp.config import HeatmapConfig
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.query.heatmap_job import run_heatmap
    from vitdecomp.serve import build

    ex, app = build(ServeConfig(store=aligned["store"], aligner=aligned["aligner"], properties=world["props"],
                                clip_checkpoint=world["checkpoint"], cache_dir=world["cache"], top_images=6,
                                top_components=3, index_cache=str(tmp_path / "ic")))
    c = app.test_client()
    layer = [x for x in ex.head_choices() if not re.search(r"\.head\.\d+$", x)][-1]
    heads = [n for n in ex.names if n.startswith(layer + ".head.")]
    html = c.get(f"/heads?component={layer}&text=a+red+circle").get_data(as_text=True)
    got = hits_of(html, "text-results")
    al, st = aligned["al"], vd.open_store(aligned["store"])
    t = encode_texts(aligned["clip"], ["a red circle"], cache_dir=world["cache"])[0].astype(np.float64)
    idx = [al.names.index(h) for h in heads]
    A, b = al.maps.double().numpy()[idx], al.bias.double().numpy() / len(al.names)
    proj = {i: float(sum(A[j] @ v[j] + b for j in range(len(idx))) @ t)
            for bt in st.iter_batches(components=heads, dtype=np.float64) for i, v in zip(bt.ids, bt.contributions)}
    assert [h[0] for h in got] == sorted(proj, key=lambda i: -proj[i])[:6]
    assert got[0][1] == pytest.approx(proj[got[0][0]], rel=1e-4)
    # an upload of image 5, decomposed by the rebuilt toy ViT and mapped by the aligner: itself first
    row = world["rows"][5]
    r = c.post("/neighbours", data={"property": "world color", "upload": (io.BytesIO(Path(row["uri"]).read_bytes()),
                                                                          "x.png")},
               content_type="multipart/form-data")
    hits = hits_of(r.get_data(as_text=True), "results")
    assert hits[0][0] == row["image_id"] and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    # segmentation through the aligner = query heatmap --aligner
    iid = world["ids"][1]
    _, m = ex.segmentation(iid, layer, ["a red circle"])
    job = run_heatmap(HeatmapConfig(store=aligned["store"], out=str(tmp_path / "h"), image_ids=[iid], components=[layer],
                                    text="a red circle", aligner=aligned["aligner"], cache_dir=world["cache"],
                                    clip_checkpoint=world["checkpoint"]))
    np.testing.assert_allclose(m, job["maps"][0], rtol=1e-6, atol=1e-9)


def test_serve_command_errors(tmp_path, capsys):
    from vitdecomp.cli import main

    assert main(["serve", "--store", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no store at" in err and "vitdecomp decompose" in err and "Traceback" not in err
    assert main(["serve", "--store", str(tmp_path), "--port", "70000"]) == 2
    assert "vitdecomp serve: error: --port: must be in 0..65535" in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_serve_starts_prints_its_url_and_serves(world):
    """``python jobs/serve.py`` in a fresh process: it prints its address (port 0: a free one), binds
    127.0.0.1 and serves the overview."""
    import sys
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, str(root / "jobs" / "serve.py"), "--store", world["store"], "--port", "0",
                          "--query", world["query"], "--index-cache", str(Path(world["root"]) / "ic-cli"), "-q"],
                         stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        line = p.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        assert m, line
        html = urllib.request.urlopen(m.group(1) + "/", timeout=120).read().decode()
        assert "vitdecomp-toy-clip" in html and "vitdecomp fit textspan --store" in html     # no --fit given
    finally:
        p.terminate()
        p.wait(30)


# ------------------------------------------------------------------------------------ in a real browser
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page target (websocket-client)."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.n = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 120.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.js(expr):
                return
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout:.0f} s for {expr}")

    def load(self, action: str):
        """Run ``action`` (JS that navigates: a click, a submit) and wait for the new page."""
        self.js("window.__vdOld = 1")
        self.js(action)
        self.wait("window.__vdOld === undefined && document.readyState === 'complete'")
        self.wait("Array.from(document.images).every(i => i.complete)")

    def shot(self, path: Path) -> None:
        h = self.js("document.documentElement.scrollHeight")
        self.call("Emulation.setDeviceMetricsOverride", width=1100, height=min(max(int(h), 600), 2400),
                  deviceScaleFactor=1, mobile=False)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def hits(self, grid: str) -> list[tuple[str, float, int]]:
        return [tuple(x) for x in self.js(
            f"Array.from(document.querySelectorAll('#{grid} figure.hit')).map(f => "
            "[f.dataset.imageId, parseFloat(f.dataset.score), f.querySelector('img').naturalWidth])")]


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        import warnings

        warnings.warn("Chromium is not installed (/usr/bin/chromium): the explorer's browser test is SKIPPED; "
                      "`apt-get install -y chromium` enables it")
        pytest.skip("Chromium is not installed (/usr/bin/chromium); `apt-get install -y chromium` enables the "
                    "explorer's browser test")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--hide-scrollbars", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        t0 = time.time()
        while port is None and time.time() - t0 < 60:
            line = proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
            elif not line and proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}")
        assert port, "chromium did not print its DevTools address"
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Network", "Log"):
            dt.call(f"{domain}.enable")
        yield dt
        dt.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_explorer_pages_render_in_chromium(world, browser):
    """The default suite's short browser check: the overview and the CompAttribute heatmap render in
    Chromium, with the query's values, only the app's own resources and no script error."""
    from vitdecomp.serve import build
    from vitdecomp.serve.app import start_server

    ex, app = build(serve_config(world))
    srv, url = start_server(app)
    try:
        browser.load(f"location.href = {json.dumps(url + '/')}")
        assert "vitdecomp-toy-clip" in browser.js("document.getElementById('store-info').textContent")
        browser.load("document.getElementById('nav-components').click()")
        cells = browser.js("Array.from(document.querySelectorAll('td.cell')).map(c => [c.dataset.component, "
                           "c.dataset.property, parseFloat(c.dataset.score), c.title])")
        sc, names, props, _ = ex.scores()
        assert len(cells) == len(names) * len(props) > 0
        for comp, prop, v, title in cells:
            assert v == pytest.approx(sc[names.index(comp), props.index(prop)], abs=1e-5)
            assert title.startswith(f"{comp} × {prop}")                   # set by the page's own script
        reqs = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert reqs and all(u.startswith(url) for u in reqs)
        assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_explorer_in_headless_chromium(world, browser, tmp_path):
    """Every panel clicked through in Chromium; values read from the page equal the library's."""
    from vitdecomp.config import HeatmapConfig, RetrieveConfig
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.query.heatmap_job import run_heatmap
    from vitdecomp.query.jobs import run_retrieve
    from vitdecomp.serve import build
    from vitdecomp.serve.app import start_server
    from vitdecomp.toyworld.registry import TOY_CLIP

    shots = Path(os.environ.get("VITDECOMP_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    ex, app = build(serve_config(world))
    srv, url = start_server(app)
    b = browser
    try:
        # overview
        b.load(f"location.href = {json.dumps(url + '/')}")
        assert "vitdecomp-toy-clip" in b.js("document.getElementById('store-info').textContent")
        b.shot(shots / "overview.png")
        # components: heatmap cells = the CompAttribute table; a cell opens the component's page
        b.load("document.getElementById('nav-components').click()")
        cells = b.js("Array.from(document.querySelectorAll('td.cell')).map(c => [c.dataset.component, "
                     "c.dataset.property, parseFloat(c.dataset.score)])")
        sc, names, props, _ = ex.scores()
        assert len(cells) == len(names) * len(props)
        for comp, prop, v in cells:
            assert v == pytest.approx(sc[names.index(comp), props.index(prop)], abs=1e-5)
        b.shot(shots / "components.png")
        head = next(iter(ex.textspan))
        b.load(f"document.querySelector('td.cell[data-component=\"{head}\"][data-property=\"world color\"] a').click()")
        assert b.js("document.querySelectorAll('#textspan tr').length") == len(ex.textspan[head]) + 1
        top = b.hits("top-images")
        assert len(top) == 8 and all(w > 0 for _, _, w in top)                      # every image decoded
        # property-based neighbours of a store image = query retrieve --image-ids
        b.load("document.getElementById('nav-neighbours').click()")
        probe = world["ids"][3]
        b.load(f"""document.getElementById('in-image-id').value = {json.dumps(probe)};
                   document.getElementById('sel-property').value = 'world background';
                   document.getElementById('in-top-components').value = '3';
                   document.getElementById('in-k').value = '8';
                   document.getElementById('go-id').click()""")
        got = b.hits("results")
        r = run_retrieve(RetrieveConfig(store=world["store"], out=str(tmp_path / "r"), property="world background",
                                        image_ids=[probe], properties=world["props"], top_components=3, top_images=8,
                                        cache_dir=world["cache"], clip_checkpoint=world["checkpoint"]))
        assert [g[0] for g in got] == r["ids"] and all(g[2] > 0 for g in got)
        np.testing.assert_allclose([g[1] for g in got], r["scores"], atol=1e-5)
        b.shot(shots / "neighbours.png")
        # an uploaded image (the store's image 5), decomposed on the fly: itself first
        doc = b.call("DOM.getDocument")["root"]["nodeId"]
        node = b.call("DOM.querySelector", nodeId=doc, selector="#in-upload")["nodeId"]
        b.call("DOM.setFileInputFiles", nodeId=node, files=[world["rows"][5]["uri"]])
        b.load("document.getElementById('go-upload').click()")
        up = b.hits("results")
        assert up[0][0] == world["ids"][5] and up[0][1] == pytest.approx(1.0, abs=1e-4)
        assert b.js("document.getElementById('upload-preview').naturalWidth") > 0
        # per-head neighbours of an image and of a text (a whole attention layer)
        layer = [x for x in ex.head_choices() if not re.search(r"\.head\.\d+$", x)][-1]
        b.load("document.getElementById('nav-heads').click()")
        b.load(f"""document.getElementById('sel-component').value = {json.dumps(layer)};
                   document.getElementById('in-image-id').value = {json.dumps(world['ids'][0])};
                   document.getElementById('in-text').value = 'a red circle';
                   document.getElementById('go').click()""")
        txt = b.hits("text-results")
        heads = [n for n in ex.names if n.startswith(layer + ".head.")]
        st = vd.open_store(world["store"])
        t = encode_texts(vd.load_model(TOY_CLIP, checkpoint=world["checkpoint"]), ["a red circle"],
                         cache_dir=world["cache"])[0]
        proj = {i: float(v.sum(0) @ t) for bt in st.iter_batches(components=heads)
                for i, v in zip(bt.ids, bt.contributions)}
        best = max(proj, key=proj.get)
        assert txt[0][0] == best and txt[0][1] == pytest.approx(proj[best], abs=1e-5)
        assert len(b.hits("image-results")) == 8
        b.shot(shots / "heads.png")
        # topic segmentation: the PNG the page shows = query heatmap's
        iid = world["ids"][2]
        b.load("document.getElementById('nav-segmentation').click()")
        b.load(f"""document.getElementById('sel-component').value = {json.dumps(layer)};
                   document.getElementById('in-image-id').value = {json.dumps(iid)};
                   document.getElementById('in-text').value = 'a red circle';
                   document.getElementById('go').click()""")
        b.wait("document.getElementById('seg-image').naturalWidth > 0")
        png = base64.b64decode(b.js("""fetch(document.getElementById('seg-image').src).then(r => r.arrayBuffer())
            .then(a => { let s = ''; new Uint8Array(a).forEach(x => s += String.fromCharCode(x));
                         return btoa(s); })"""))
        job = run_heatmap(HeatmapConfig(store=world["store"], out=str(tmp_path / "h"), image_ids=[iid],
                                        components=[layer], text="a red circle", cache_dir=world["cache"],
                                        checkpoint=world["checkpoint"], clip_checkpoint=world["checkpoint"]))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
                              np.asarray(Image.open(job["pngs"][0]).convert("RGB")))
        b.shot(shots / "segmentation.png")
        # contrastive segmentation renders too
        b.load("""document.getElementById('in-text2').value = 'a blue square';
                  document.getElementById('go').click()""")
        b.wait("document.getElementById('seg-image').naturalWidth > 0")
        # group robustness: the bars are the mitigation's accuracies; an ablated component links to its page
        b.load("document.getElementById('nav-robustness').click()")
        s = json.load(open(os.path.join(world["query"], "mitigation.json")))
        bars = b.js("Array.from(document.querySelectorAll('rect.bar')).map(r => [r.dataset.group, r.dataset.series, "
                    "parseFloat(r.dataset.value)])")
        assert len(bars) == 2 * len(s["groups"]["before"])
        for g, k, v in bars:
            assert v == pytest.approx(s["groups"][k][g], abs=1e-6)
        assert b.js("document.querySelectorAll('#ablation circle.point').length") > 0
        b.shot(shots / "robustness.png")
        first = s["ablated"][0]
        b.load("document.querySelector('a.ablated').click()")
        assert first in b.js("document.querySelector('h1').textContent")
        assert "ablated" in b.js("document.getElementById('effects').textContent")
        # interpretability scores = the query's
        b.load("document.getElementById('nav-interpretability').click()")
        i = json.load(open(os.path.join(world["query"], "interpretability.json")))
        assert float(b.js("document.getElementById('association').textContent")) == pytest.approx(
            i["association_score"], abs=1e-4)
        assert float(b.js("document.getElementById('entanglement').textContent")) == pytest.approx(
            i["entanglement_score"], abs=1e-4)
        b.shot(shots / "interpretability.png")
        # offline: every request went to the app itself (or was inline data); no script error, no CSP report
        reqs = [e["params"]["request"]["url"] for e in b.events if e.get("method") == "Network.requestWillBeSent"]
        assert reqs and all(u.startswith(url) or u.startswith("data:") for u in reqs), \
            [u for u in reqs if not u.startswith(url)][:5]
        errors = [e for e in b.events if e.get("method") == "Runtime.exceptionThrown" or
                  (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors[:3]
    finally:
        srv.shutdown()
