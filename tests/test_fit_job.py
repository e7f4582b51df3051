"""The fit job on real stores (tiny random-init toy models): TextSpan from distributed moments,
CompAlign from the teacher column, and the errors users hit."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import vitdecomp as vd
from jobutil import make_images
from vitdecomp.config import DecomposeConfig
from vitdecomp.pipeline import run_decompose as run
from vitdecomp.errors import InputError
from vitdecomp.config import CompAlignConfig, TextSpanConfig
from vitdecomp.fit.jobs import run_compalign, run_textspan
from vitdecomp.fit.text import encode_texts, read_pool
from vitdecomp.fit.textspan import Moments, textspan_one
from vitdecomp.query.compattribute import read_properties
from vitdecomp.toyworld.registry import TOY_CLIP, TOY_VIT


@pytest.fixture(scope="module")
def stores(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("fitimgs")
    make_images(root, n=40, corrupt=False)
    out = tmp_path_factory.mktemp("fitstores")
    common = dict(input=str(root), batch_size=16, commit_every=16, dtype="fp32")
    run(DecomposeConfig(output=str(out / "clip"), model=TOY_CLIP, label_from_folder=True, **common))
    run(DecomposeConfig(output=str(out / "vit"), model=TOY_VIT, teacher=TOY_CLIP, **common))
    run(DecomposeConfig(output=str(out / "plain"), model=TOY_VIT, **common))
    return {k: str(out / k) for k in ("clip", "vit", "plain")}


@pytest.fixture()
def pool(tmp_path):
    p = tmp_path / "pool.txt"
    p.write_text("a red circle\n\na blue square\na red circle\na green cross\na shape on ocean\na striped triangle\n")
    return str(p)


def test_pool_file_drops_blanks_and_duplicates(pool, tmp_path):
    assert read_pool(pool) == ["a red circle", "a blue square", "a green cross", "a shape on ocean",
                               "a striped triangle"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        read_pool(str(tmp_path / "empty.txt"))
    assert len(read_pool(None)) > 2000


def test_textspan_on_a_clip_store_equals_in_memory(stores, pool, tmp_path):
    out = tmp_path / "ts"
    r = run_textspan(TextSpanConfig(store=stores["clip"], out=str(out), pool=pool, texts_per_head=3, rank=16,
                                 last_layers=2, cache_dir=str(tmp_path / "cache")))
    table = r["table"]
    assert (out / "textspan.parquet").exists() and (out / "textspan.txt").exists()
    st = vd.open_store(stores["clip"])
    heads = [c.name for c in st.components if c.kind == "head" and c.block >= 2]
    assert sorted(set(table.column("component").to_pylist())) == sorted(heads)
    # the same algorithm on moments computed in memory from iter_batches
    torch.manual_seed(0)                   # the job builds random-init text models from seed 0
    torch_seeded = vd.load_model(TOY_CLIP)
    texts = encode_texts(torch_seeded, read_pool(pool), cache_dir=str(tmp_path / "cache"))
    X = np.concatenate([b.contributions for b in st.iter_batches(components=heads[:1], dtype=np.float64)])
    mo = Moments.of(X)
    res = textspan_one(mo.n, mo.mean[0], mo.xtx[0], texts, m=3, rank=16)
    got = [r["text_index"] for r in table.to_pylist() if r["component"] == heads[0]]
    assert got == res.picks
    # the report: one row per component, its texts in pick order with the variance each explains
    by = pq.read_table(out / "textspan_by_component.parquet").to_pylist()
    assert [b["component"] for b in by] == list(dict.fromkeys(table.column("component").to_pylist()))
    first = next(b for b in by if b["component"] == heads[0])
    pool_texts = read_pool(pool)
    assert first["texts"].split(" · ")[0].startswith(pool_texts[res.picks[0]] + " (+")
    assert first["variance_explained"] == pytest.approx(res.variance_explained[-1])
    html = (out / "report.html").read_text()
    assert r["report"].endswith("report.html") and "TextSpan" in html and heads[0] in html


def test_compalign_from_store_and_textspan_through_the_aligner(stores, pool, tmp_path):
    art = str(tmp_path / "align")
    metrics = run_compalign(CompAlignConfig(store=stores["vit"], out=art, max_epochs=2, lr=1e-3))
    assert len(metrics["history"]) == 2 and np.isfinite(metrics["best_val_cosine"])
    aligner = vd.fit.Aligner.load(art)
    st = vd.open_store(stores["vit"])
    b = next(vd.fit.aligned_batches(st, aligner, batch_size=8))
    raw = next(st.iter_batches(batch_size=8))
    A, bias = aligner.maps.numpy().astype(np.float64), aligner.bias.numpy().astype(np.float64)
    by_hand = np.einsum("kod,bkd->bko", A, raw.contributions.astype(np.float64)) + bias / len(st.names)
    assert list(b.ids) == list(raw.ids) and aligner.names == st.names
    np.testing.assert_allclose(b.contributions, by_hand, rtol=1e-5, atol=1e-5 * np.abs(by_hand).max())
    r = run_textspan(TextSpanConfig(store=stores["vit"], out=str(tmp_path / "ts"), pool=pool, aligner=art,
                                 texts_per_head=2, rank=8, cache_dir=str(tmp_path / "cache"), distributed=False))
    assert r["table"].num_rows == 2 * 16              # 2 texts x 4 heads x the last 4 blocks (the default)
    with pytest.raises(InputError, match="not for this store"):
        run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "x"), pool=pool, aligner=art))


def test_fit_errors_say_how_to_fix(stores, pool, tmp_path):
    with pytest.raises(InputError, match="teacher"):
        run_compalign(CompAlignConfig(store=stores["plain"], out=str(tmp_path / "a")))
    with pytest.raises(InputError, match="aligner"):
        run_textspan(TextSpanConfig(store=stores["plain"], out=str(tmp_path / "b"), pool=pool))
    with pytest.raises(InputError, match="same model"):
        run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "c"), pool=pool, clip="open_clip:ViT-S-16"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InputError, match="empty"):
        run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "d"), pool=str(tmp_path / "empty.txt")))


def test_textspan_reconstruction_evaluation(stores, pool, tmp_path):
    """With as many texts as dimensions the reconstruction is exact, so the evaluated accuracy must
    equal that of mean-ablating the earlier layers alone (computed here independently)."""
    big = tmp_path / "big.txt"
    from vitdecomp.fit.text import default_pool

    big.write_text("\n".join(default_pool()[:200]) + "\n")
    r = run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "ev"), pool=str(big), texts_per_head=64,
                                 rank=64, last_layers=2, label_column="label", class_names=["red", "blue"],
                                 cache_dir=str(tmp_path / "cache"), distributed=False))
    ev = r["evaluation"]
    assert ev["images"] == 40 and ev["classes"] == ["red", "blue"]
    assert ev["accuracy_reconstructed"] == ev["accuracy_mean_ablated_only"]
    st = vd.open_store(stores["clip"])
    assert ev["mean_ablated_components"] == ["embed"] + [c.name for c in st.components
                                                         if c.block is not None and c.block < 2]
    # independent: mean-ablate embed and blocks 0-1, zero-shot with the class texts
    torch.manual_seed(0)
    clip = vd.load_model(TOY_CLIP)
    T = encode_texts(clip, ["red", "blue"], cache_dir=str(tmp_path / "cache"))
    bs = list(st.iter_batches(batch_size=100, columns=["label"], dtype=np.float64))
    full = np.concatenate([b.contributions for b in bs])
    c = full.copy()
    idx = [k for k, n in enumerate(st.names) if n in ev["mean_ablated_components"]]
    c[:, idx] = full[:, idx].mean(0)
    pred = (c.sum(1) @ T.T).argmax(-1)
    y = [["red", "blue"].index(v) for b in bs for v in b.columns["label"].to_pylist()]
    assert abs(ev["accuracy_mean_ablated_only"] - np.mean(pred == np.array(y))) < 1e-12
    r2 = run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "ev2"), pool=pool, texts_per_head=2,
                                  rank=8, last_layers=2, label_column="label", cache_dir=str(tmp_path / "cache"),
                                  distributed=False))
    # independent: each explained head replaced by mean + (X − mean)QQᵀ, Q spanning its picked texts
    # projected on the top-8 right singular vectors of its raw X; earlier layers mean-ablated
    ev2 = r2["evaluation"]
    assert ev2["classes"] == ["blue", "red"]                       # default: the sorted label values
    pool_emb = encode_texts(clip, read_pool(pool), cache_dir=str(tmp_path / "cache")).astype(np.float64)
    T2 = encode_texts(clip, ["blue", "red"], cache_dir=str(tmp_path / "cache")).astype(np.float64)
    y2 = np.array([["blue", "red"].index(v) for b in bs for v in b.columns["label"].to_pylist()])
    rec = c.copy()                                                 # embed and blocks 0-1 already mean-ablated
    picked = {}
    for row in r2["table"].to_pylist():
        picked.setdefault(row["component"], []).append(row["text_index"])
    assert sorted(picked) == sorted(x.name for x in st.components if x.kind == "head" and x.block >= 2)
    for name, picks in picked.items():
        k = st.names.index(name)
        X = full[:, k]
        V = np.linalg.svd(X, full_matrices=False)[2][:8].T
        Q = np.linalg.qr((pool_emb[picks] @ V @ V.T).T)[0]
        rec[:, k] = X.mean(0) + (X - X.mean(0)) @ Q @ Q.T
    acc = lambda z: float(np.mean((z.sum(1) @ T2.T).argmax(-1) == y2))  # noqa: E731
    assert abs(ev2["accuracy_reconstructed"] - acc(rec)) < 1e-12
    assert abs(ev2["accuracy_full"] - acc(full)) < 1e-12
    with pytest.raises(InputError, match="label_column"):
        run_textspan(TextSpanConfig(store=stores["clip"], out=str(tmp_path / "ev3"), pool=pool, label_column="nope"))


def test_query_compattribute_on_stores(stores, tmp_path):
    from vitdecomp.config import CompAttributeConfig
    from vitdecomp.query.jobs import run_compattribute

    props = tmp_path / "props.yaml"
    props.write_text("redness: [red color, crimson]\nscene: [ocean, forest]\n")
    r = run_compattribute(CompAttributeConfig(store=stores["clip"], out=str(tmp_path / "q"), properties=str(props),
                                           cache_dir=str(tmp_path / "cache")))
    assert (tmp_path / "q" / "compattribute.parquet").exists() and (tmp_path / "q" / "compattribute.png").exists()
    # independent: docs/method.md “CompAttribute” on the stored contributions, property by property (numpy QR and corrcoef)
    st = vd.open_store(stores["clip"])
    assert r["names"] == st.names and r["properties"] == list(read_properties(str(props)))
    torch.manual_seed(0)                   # the job builds random-init text models from seed 0
    clip = vd.load_model(TOY_CLIP)
    emb = {p: encode_texts(clip, d, cache_dir=str(tmp_path / "cache")) for p, d in read_properties(str(props)).items()}
    full = np.concatenate([b.contributions for b in st.iter_batches(dtype=np.float64)])
    # (the streamed sums leave a constant component at ~1e-8 instead of 0: cancellation in Σp² − (Σp)²/n)
    np.testing.assert_allclose(r["scores"], direct_compattribute(full, list(emb.values())), atol=1e-6)
    r2 = run_compattribute(CompAttributeConfig(store=stores["clip"], out=str(tmp_path / "q2"), properties=str(props),
                                            cache_dir=str(tmp_path / "cache"), distributed=False))
    np.testing.assert_allclose(r["scores"], r2["scores"], atol=1e-9)     # distributed == in-process
    art = str(tmp_path / "align")
    run_compalign(CompAlignConfig(store=stores["vit"], out=art, max_epochs=1))
    r3 = run_compattribute(CompAttributeConfig(store=stores["vit"], out=str(tmp_path / "q3"), aligner=art,
                                            cache_dir=str(tmp_path / "cache")))
    # through the aligner: every component mapped by hand (A_k c + b/K), then the same formula
    aligner = vd.fit.Aligner.load(art)
    raw = np.concatenate([b.contributions for b in vd.open_store(stores["vit"]).iter_batches(dtype=np.float64)])
    A, bias = aligner.maps.numpy().astype(np.float64), aligner.bias.numpy().astype(np.float64)
    mapped = np.einsum("kod,bkd->bko", A, raw) + bias / len(aligner.names)
    emb7 = [emb[p] for p in r3["properties"]]
    assert r3["properties"] == list(vd.query.DEFAULT_PROPERTIES) and r3["names"] == aligner.names
    # (the aligner maps in float32; a compact store's decoded heads are not fp16-representable, so its
    # float32 rounding reaches the scores of this 12-image corpus at ~2e-5)
    np.testing.assert_allclose(r3["scores"], direct_compattribute(mapped, emb7), atol=5e-5)
    with pytest.raises(InputError, match="aligner"):
        run_compattribute(CompAttributeConfig(store=stores["plain"], out=str(tmp_path / "q4")))
    with pytest.raises(InputError, match="unknown component"):
        run_compattribute(CompAttributeConfig(store=stores["clip"], out=str(tmp_path / "q5"), components=["embedd"]))


def direct_compattribute(c: np.ndarray, embeddings: list) -> np.ndarray:
    """``[K, P]``: per property, the mean over the orthonormalised description directions (QR, given
    order) of the Pearson correlation over images of ⟨c_k, q⟩ with ⟨Σ_j c_j, q⟩ (0 for a constant one,
    e.g. the ``bias`` component)."""
    def pearson(a, b):
        return 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else np.corrcoef(a, b)[0, 1]

    out = np.zeros((c.shape[1], len(embeddings)))
    total = c.sum(1)
    for j, e in enumerate(embeddings):
        Q = np.linalg.qr(np.asarray(e, np.float64).T)[0].T
        for k in range(c.shape[1]):
            out[k, j] = np.mean([pearson(total @ q, c[:, k] @ q) for q in Q])
    return out


def test_list_options_parse_as_lists():
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.options import config_from_args

    a = build_parser().parse_args(["fit", "textspan", "--store", "s", "--out", "o", "--components",
                                   "blocks.1.attn.head.0", "blocks.2.attn.head.1", "--class-names", "a", "b"])
    c = config_from_args(a, TextSpanConfig)
    assert c.components == ["blocks.1.attn.head.0", "blocks.2.attn.head.1"] and c.class_names == ["a", "b"]


def test_query_retrieve_ranks_by_the_top_components_projection(stores, tmp_path):
    from vitdecomp.config import RetrieveConfig
    from vitdecomp.query.jobs import run_retrieve

    r = run_retrieve(RetrieveConfig(store=stores["clip"], out=str(tmp_path / "r"), property="color",
                                 text="a red circle", top_components=3, top_images=5,
                                 cache_dir=str(tmp_path / "cache")))
    t = r["table"].to_pylist()
    assert len(t) == 5 and [x["score"] for x in t] == sorted([x["score"] for x in t], reverse=True)
    assert (tmp_path / "r" / "retrieval.png").exists() and (tmp_path / "r" / "retrieval.parquet").exists()
    # independent check of the best score: Σ of the 3 components · the probe text
    st = vd.open_store(stores["clip"])
    torch.manual_seed(0)
    clip = vd.load_model(TOY_CLIP)
    probe = encode_texts(clip, ["a red circle"], cache_dir=str(tmp_path / "cache"))[0]
    b = list(st.iter_batches(components=r["components"], ids=[t[0]["image_id"]]))[0]
    assert abs(float(b.contributions.sum(1)[0] @ probe) - t[0]["score"]) < 1e-4
    with pytest.raises(InputError, match="unknown property"):
        run_retrieve(RetrieveConfig(store=stores["clip"], out=str(tmp_path / "x"), property="colour", text="red"))
