"""Token heatmaps and zero-shot segmentation (docs/method.md “Token heatmaps and segmentation”): a hand-written per-token direct effect, a
planted patch, the metrics on hand-computed cases, and `vitdecomp query heatmap` on tiny stores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vitdecomp as vd
from jobutil import run_cli
from vitdecomp.errors import InputError
from vitdecomp.config import HeatmapConfig
from vitdecomp.query.heatmap_job import run_heatmap
from vitdecomp.query.heatmaps import (average_precision, class_direction, read_image, segmentation_metrics, summarise,
                                      token_heatmaps, upsample)

GRID = (4, 6)                      # non-square on purpose: rows and columns must not be swapped
PATCH = 8


def tiny_vit(reg_tokens: int = 2, zero_pos: bool = False, seed: int = 0):
    """A random timm ViT (32x48 px, patch 8, 2 registers) with weights large enough for peaky attention."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    m = VisionTransformer(img_size=(GRID[0] * PATCH, GRID[1] * PATCH), patch_size=PATCH, embed_dim=32, depth=2,
                          num_heads=4, mlp_ratio=2.0, num_classes=3, reg_tokens=reg_tokens)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
        if zero_pos:
            m.pos_embed.zero_()
    m.requires_grad_(False)
    return m.double().eval()


def hand_token_effects(m, x: torch.Tensor, block: int, head: int) -> torch.Tensor:
    """Per-patch direct effect of one head on the CLS readout, ``[B, gh, gw, D]``, written from the
    formulas: α = softmax_m(q_cls·k_m/√dh), t_m = α_m v_m W_O,hᵀ, then the final LayerNorm with the
    statistics of the real final CLS state (centred per term, no β)."""
    cap = {}
    attn = m.blocks[block].attn
    h1 = attn.register_forward_pre_hook(lambda _, a: cap.__setitem__("x", a[0]))
    h2 = m.norm.register_forward_pre_hook(lambda _, a: cap.__setitem__("final", a[0]))
    try:
        with torch.no_grad():
            m(x)
    finally:
        h1.remove()
        h2.remove()
    xin, final = cap["x"], cap["final"]
    B, n, D = xin.shape
    H = attn.num_heads
    dh = D // H
    qkv = (xin @ attn.qkv.weight.T + attn.qkv.bias).view(B, n, 3, H, dh)
    q, k, v = qkv[:, :, 0, head], qkv[:, :, 1, head], qkv[:, :, 2, head]          # [B, n, dh]
    alpha = torch.softmax((q[:, 0:1] @ k.transpose(1, 2))[:, 0] / dh ** 0.5, dim=-1)  # [B, n]
    w_o = attn.proj.weight[:, head * dh:(head + 1) * dh]                            # [D, dh]
    t = alpha[..., None] * (v @ w_o.T)                                              # [B, n, D]
    cls = final[:, 0]
    sigma = torch.sqrt(cls.var(-1, unbiased=False) + m.norm.eps)
    c = m.norm.weight * (t - t.mean(-1, keepdim=True)) / sigma[:, None, None]
    return c[:, m.num_prefix_tokens:].reshape(B, *GRID, D)


# ------------------------------------------------------------------------ (1) planted tokens
def test_one_head_matches_the_hand_written_token_effect():
    m = tiny_vit()
    x = torch.randn(2, 3, GRID[0] * PATCH, GRID[1] * PATCH, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    u = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).numpy()
    for block, head in ((1, 2), (0, 3)):
        want = (hand_token_effects(m, x, block, head) @ torch.from_numpy(u)).numpy()
        got = token_heatmaps(m, x, [f"blocks.{block}.attn.head.{head}"], u)
        assert got.shape == (2, *GRID)
        assert np.abs(want).max() > 1e-3                                  # a map with something in it
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # a whole layer is the sum of its heads; several components are summed
    layer = token_heatmaps(m, x, ["blocks.1.attn"], u)
    heads = sum(token_heatmaps(m, x, [f"blocks.1.attn.head.{h}"], u) for h in range(4))
    np.testing.assert_allclose(layer, heads, rtol=1e-9, atol=1e-12)
    both = token_heatmaps(m, x, ["blocks.1.attn", "blocks.0.attn.head.3"], u)
    np.testing.assert_allclose(both, layer + token_heatmaps(m, x, ["blocks.0.attn.head.3"], u), atol=1e-12)


def test_class_logit_direction_and_the_aligner_map():
    m = tiny_vit()
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u = class_direction(m, 2)
    np.testing.assert_array_equal(u, m.head.weight[2].detach().numpy())
    want = (hand_token_effects(m, x, 1, 0) @ m.head.weight[2].detach()).numpy()
    np.testing.assert_allclose(token_heatmaps(m, x, ["blocks.1.attn.head.0"], u), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="out of range"):
        class_direction(m, 3)
    # one direction per image: each image's map is its own projection
    x2 = torch.cat([x, x.flip(-1)])
    U = np.stack([class_direction(m, 0), class_direction(m, 2)])
    per = token_heatmaps(m, x2, ["blocks.1.attn.head.0"], U)
    np.testing.assert_allclose(per[0], token_heatmaps(m, x2, ["blocks.1.attn.head.0"], U[0])[0], atol=1e-12)
    np.testing.assert_allclose(per[1], token_heatmaps(m, x2, ["blocks.1.attn.head.0"], U[1])[1], atol=1e-12)
    with pytest.raises(InputError, match="one per image"):
        token_heatmaps(m, x2, ["blocks.1.attn.head.0"], np.ones((3, 32)))
    # through an aligner A_k: ⟨A_k c, t⟩ = ⟨c, A_kᵀ t⟩ for each head's own map; a layer uses its heads' maps
    from vitdecomp.fit.compalign import Aligner

    names = [f"blocks.1.attn.head.{h}" for h in range(4)]
    g = torch.Generator().manual_seed(6)
    al = Aligner(names, torch.randn(4, 5, 32, generator=g), torch.randn(5, generator=g))
    t = torch.randn(5, generator=g).double().numpy()
    got = token_heatmaps(m, x, ["blocks.1.attn"], t, aligner=al)
    want = sum(token_heatmaps(m, x, [n], al.maps[k].double().numpy().T @ t) for k, n in enumerate(names))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(InputError, match="no map"):
        token_heatmaps(m, x, ["blocks.0.attn.head.0"], t, aligner=al)
    with pytest.raises(InputError, match="dimensions"):
        token_heatmaps(m, x, ["blocks.1.attn"], np.ones(7), aligner=al)


@pytest.mark.parametrize("where", [(0, 5), (3, 1), (2, 2)])
def test_planted_patch_is_the_heatmap_peak_after_upsampling(where):
    """A constant image except one patch, no position embedding: every background token is identical
    in every layer, so the map is flat except at the planted patch; with a direction along the
    planted token's (hand-computed) excess effect that patch is the peak, in image coordinates."""
    m = tiny_vit(zero_pos=True, seed=1)
    r, c = where
    x = torch.full((1, 3, 32, 48), 0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    x[:, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = torch.randn(3, PATCH, PATCH, generator=g,
                                                                               dtype=torch.float64)
    eff = hand_token_effects(m, x, 1, 1)[0]                               # [gh, gw, D]
    bg = eff[(r + 1) % GRID[0], (c + 1) % GRID[1]]
    u = (eff[r, c] - bg).numpy()
    hm = token_heatmaps(m, x, ["blocks.1.attn.head.1"], u)[0]
    others = np.delete(hm.ravel(), r * GRID[1] + c)
    assert np.ptp(others) < 1e-9 * max(1.0, np.abs(hm).max())              # flat background
    assert hm[r, c] > others.max() + 1e-6
    up = upsample(hm[None], (32, 48))[0]
    py, px = np.unravel_index(np.argmax(up), up.shape)
    assert (py // PATCH, px // PATCH) == (r, c)
    # a random direction too: the only patch that differs is the planted one
    v = np.random.default_rng(0).normal(size=32)
    hv = token_heatmaps(m, x, ["blocks.1.attn.head.1"], v)[0]
    dev = np.abs(hv - np.median(hv))
    assert np.unravel_index(np.argmax(dev), GRID) == (r, c) and np.sort(dev.ravel())[-2] < 1e-9


def test_unknown_and_token_less_components_fail_clearly():
    m = tiny_vit()
    x = torch.zeros(1, 3, 32, 48, dtype=torch.float64)
    with pytest.raises(InputError, match=r"unknown component 'blocks\.1\.atn\.head\.0'.*blocks\.1\.attn\.head\.0"):
        token_heatmaps(m, x, ["blocks.1.atn.head.0"], np.ones(32))
    with pytest.raises(InputError, match="is a mlp component.*blocks.1.attn"):
        token_heatmaps(m, x, ["blocks.1.mlp"], np.ones(32))
    with pytest.raises(InputError, match="dimensions"):
        token_heatmaps(m, x, ["blocks.1.attn.head.0"], np.ones(31))


# ------------------------------------------------------------------------------- (2) metrics
def test_average_precision_hand_cases():
    assert average_precision([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # ties enter together: {0.9}: P=1 R=.5; {0.8, 0.8}: P=2/3 R=1
    assert average_precision([0.9, 0.8, 0.8, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(1.0)
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))
    # every negative ranked above every positive (one tie group each): AP = positive fraction
    y = np.zeros(50, bool)
    y[:7] = True
    assert average_precision(1.0 - y, y) == pytest.approx(7 / 50)
    # distinct inverted scores: AP = (1/P) Σ_k k / (N_neg + k)
    s = np.r_[np.linspace(0, 0.1, 7), np.linspace(0.5, 1, 43)]
    assert average_precision(s, y) == pytest.approx(np.mean([k / (43 + k) for k in range(1, 8)]))


def test_segmentation_metrics_hand_case():
    score = np.array([[0.0, 0.2, 1.0], [0.9, 0.1, 0.4]])
    mask = np.array([[0, 1, 1], [1, 0, 0]], bool)
    r = segmentation_metrics(score, mask)
    # mean of the normalised map = 2.6/6 → prediction [[0,0,1],[1,0,0]]
    assert r["threshold"] == pytest.approx(2.6 / 6)
    assert r["pixacc"] == pytest.approx(5 / 6)
    assert r["iou_fg"] == pytest.approx(2 / 3) and r["iou_bg"] == pytest.approx(3 / 4)
    assert r["miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert r["ap"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    # background AP on 1 - s: order 0.0(bg) 0.1(bg) 0.2(fg) 0.4(bg) → (1 + 1 + 3/4) / 3
    assert r["ap_bg"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert r["map"] == pytest.approx((r["ap"] + r["ap_bg"]) / 2)
    # the scale and offset of the map do not matter (min-max normalised)
    r2 = segmentation_metrics(5 * score - 3, mask)
    assert all(r2[k] == pytest.approx(r[k]) for k in ("pixacc", "miou", "ap", "map"))


def test_perfect_inverted_and_constant_maps():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    p = segmentation_metrics(mask.astype(float), mask)
    assert p["pixacc"] == 1.0 and p["miou"] == 1.0 and p["ap"] == 1.0 and p["map"] == 1.0
    inv = segmentation_metrics(1.0 - mask, mask)
    assert inv["pixacc"] == 0.0 and inv["miou"] == 0.0
    assert inv["ap"] == pytest.approx(mask.mean())
    const = segmentation_metrics(np.full((8, 8), 2.0), mask)
    assert const["pixacc"] == pytest.approx(1 - mask.mean()) and const["iou_fg"] == 0.0
    assert const["ap"] == pytest.approx(mask.mean())
    s = summarise([p, inv])
    assert s["mean_pixacc"] == pytest.approx(0.5) and s["mean_ap"] == pytest.approx((1 + mask.mean()) / 2)
    assert s["pooled_pixacc"] == pytest.approx(0.5)
    # pooled: fg Σinter/Σunion = (12 + 0) / (12 + 64), bg = (52 + 0) / (52 + 64)
    assert s["pooled_miou"] == pytest.approx((12 / 76 + 52 / 116) / 2)


# ------------------------------------------------------------------------- (3) the subcommand
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vitdecomp.toyworld.generate import WorldConfig, generate, load_metadata, sample_attributes, write_masks

    cfg = WorldConfig(seed=3, n_train=6, n_val=0, n_test=0)
    root = tmp_path_factory.mktemp("hmworld")
    generate(str(root), cfg)
    masks = write_masks(str(root), cfg)
    attrs = {a["image_id"]: a for a in sample_attributes(cfg)}
    return {"root": root, "cfg": cfg, "masks": masks, "attrs": attrs, "meta": load_metadata(str(root))}


@pytest.fixture(scope="module")
def stores(ray_local, world, tmp_path_factory):
    """A toy-ViT store (folder source, ids 'train/0000k.png') and a toy-CLIP store from a table with a
    mask-URI column (its images are copies, so a test may change one)."""
    from vitdecomp.config import DecomposeConfig
    from vitdecomp.pipeline import run_decompose as run
    from vitdecomp.toyworld.registry import TOY_CLIP, TOY_VIT

    out = tmp_path_factory.mktemp("hmstores")
    run(DecomposeConfig(input=str(world["root"] / "images"), output=str(out / "vit"), model=TOY_VIT,
                        batch_size=8, dtype="fp32", blocks="1-3"))
    copies = out / "clipimgs"
    rows = []
    for r in world["meta"].to_pylist():
        dst = copies / (r["image_id"] + ".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["uri"], dst)
        rows.append({"image_id": r["image_id"], "uri": str(dst),
                     "mask": os.path.join(world["masks"], r["image_id"] + ".png")})
    pq.write_table(pa.Table.from_pylist(rows), out / "table.parquet")
    run(DecomposeConfig(input=str(out / "table.parquet"), output=str(out / "clip"), model=TOY_CLIP, batch_size=8))
    return {"vit": str(out / "vit"), "clip": str(out / "clip"), "clip_images": copies}


def test_write_masks_matches_the_rendered_objects(world, tmp_path):
    from vitdecomp.toyworld.generate import WorldConfig, object_mask, render, write_masks

    got = write_masks(str(world["root"]), world["cfg"], split="train", out_dir=str(tmp_path / "m"))
    assert sorted(os.listdir(os.path.join(got, "train"))) == [f"{i:05d}.png" for i in range(6)]
    with pytest.raises(ValueError, match="another WorldConfig"):
        write_masks(str(world["root"]), WorldConfig(seed=4, n_train=6, n_val=0, n_test=0))

    a = world["attrs"]["train/00002"]
    m = object_mask(a, 64)
    assert 0.01 < m.mean() < 0.5
    png = np.asarray(Image.open(os.path.join(world["masks"], "train/00002.png"))) > 127
    np.testing.assert_array_equal(png, m)
    # the mask is where the object was painted: the image differs from its background-only rendering there
    img = render(a, 64).astype(int)
    bg = render({**a, "radius": 0.0}, 64).astype(int)
    assert (np.abs(img - bg).sum(-1)[~m] == 0).all() and (np.abs(img - bg).sum(-1)[m] > 0).mean() > 0.9


@pytest.mark.slow
def test_heatmap_job_class_logit_with_masks_matches_in_process(stores, world, tmp_path):
    from vitdecomp.query.heatmaps import mask_to_input
    from vitdecomp.toyworld.registry import TOY_VIT

    out = tmp_path / "hm"
    ids = ["train/00004.png", "train/00001.png"]
    comps = ["blocks.3.attn.head.1", "blocks.2.attn"]
    r = run_heatmap(HeatmapConfig(store=stores["vit"], out=str(out), image_ids=ids, components=comps, class_index="1",
                               masks_dir=world["masks"]))
    t = pq.read_table(out / "heatmaps.parquet").to_pylist()
    assert [row["image_id"] for row in t] == ids
    for row in t:
        assert (out / row["png"]).is_file() and row["components"] == comps and row["target"] == "class 1"
    assert (out / "heatmap_grid.png").is_file()
    sidecar = json.loads((out / "heatmap.section.json").read_text())
    assert sidecar["name"] == "heatmap" and sidecar["order"] == 60
    assert {i["path"] for i in sidecar["images"]} == {"heatmap_grid.png"}
    # the same maps in this process: the store's model rebuilt from seed 0, blocks 1-3
    torch.manual_seed(0)
    lm = vd.load_model(TOY_VIT)
    x = torch.stack([lm.transform(read_image(str(world["root"] / "images" / i))) for i in ids])
    want = token_heatmaps(lm, x, comps, class_direction(lm, 1), blocks=[1, 2, 3])
    got = np.array([row["heatmap"] for row in t]).reshape(2, 8, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert [(row["peak_row"], row["peak_col"]) for row in t] == [divmod(int(np.argmax(w)), 8) for w in want]
    # segmentation against the planted masks (toy ViT input = the 64 px image: the mask is unchanged)
    seg = pq.read_table(out / "segmentation.parquet").to_pylist()
    assert [s["kind"] for s in seg] == ["image", "image", "mean", "pooled"]
    up = upsample(want, (64, 64))
    for k, i in enumerate(ids):
        mask = mask_to_input(Image.open(os.path.join(world["masks"], i)), lm)
        np.testing.assert_array_equal(mask, world_mask(world, i))
        ref = segmentation_metrics(up[k], mask)
        for key in ("pixacc", "miou", "ap", "map"):
            assert seg[k][key] == pytest.approx(ref[key], abs=1e-6)
            assert t[k][key] == pytest.approx(ref[key], abs=1e-6)
    assert seg[2]["pixacc"] == pytest.approx(np.mean([s["pixacc"] for s in seg[:2]]))
    assert r["summary"]["images"] == 2
    # 'pred': each image's own predicted class (from the stored readout and the classifier)
    rp = run_heatmap(HeatmapConfig(store=stores["vit"], out=str(tmp_path / "pred"), image_ids=ids, components=comps,
                                class_index="pred"))
    from vitdecomp.query.heatmaps import predicted_classes

    with torch.no_grad():
        z = vd.decompose(lm, x, blocks=[1, 2, 3]).readout
        logits = lm.model.forward_head(lm.model.forward_features(x))
    ks = logits.argmax(-1).tolist()
    assert predicted_classes(lm, z.numpy()).tolist() == ks
    assert rp["table"].column("class_index").to_pylist() == ks
    assert rp["table"].column("target").to_pylist() == [f"class {k} (predicted)" for k in ks]
    for j, k in enumerate(ks):
        np.testing.assert_allclose(rp["maps"][j], token_heatmaps(lm, x[j:j + 1], comps, class_direction(lm, k),
                                                                 blocks=[1, 2, 3])[0], rtol=1e-5, atol=1e-7)


def world_mask(world, image_id):
    from vitdecomp.toyworld.generate import object_mask

    return object_mask(world["attrs"][image_id.rsplit(".", 1)[0]], 64)


@pytest.mark.slow
def test_heatmap_job_text_on_a_clip_store_with_a_mask_column(stores, world, tmp_path):
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.toyworld.registry import TOY_CLIP

    out = tmp_path / "hmclip"
    r = run_heatmap(HeatmapConfig(store=stores["clip"], out=str(out), top_n=3, components=["transformer.resblocks.3.attn"],
                               text="a red circle", mask_column="mask", cache_dir=str(tmp_path / "cache")))
    ids = sorted(world["attrs"])[:3]
    assert r["ids"] == ids
    torch.manual_seed(0)
    lm = vd.load_model(TOY_CLIP)
    u = encode_texts(lm, ["a red circle"], cache_dir=str(tmp_path / "cache"))[0]
    x = torch.stack([lm.transform(read_image(str(stores["clip_images"] / (i + ".png")))) for i in ids])
    want = token_heatmaps(lm, x, ["transformer.resblocks.3.attn"], u)
    np.testing.assert_allclose(r["maps"], want, rtol=1e-5, atol=1e-7)
    seg = pq.read_table(out / "segmentation.parquet").to_pylist()
    assert len(seg) == 5
    up = upsample(want, (64, 64))
    for k, i in enumerate(ids):                    # masks read through the column's URIs
        ref = segmentation_metrics(up[k], world_mask(world, i))
        assert [seg[k][key] for key in ("pixacc", "miou", "ap")] == pytest.approx(
            [ref[key] for key in ("pixacc", "miou", "ap")], abs=1e-6)


@pytest.mark.slow
def test_heatmap_cli_and_errors(stores, world, tmp_path):
    out = tmp_path / "cli"
    p = run_cli(["query.py", "heatmap", "--store", stores["vit"], "--out", str(out), "--top-n", "2",
                 "--components", "blocks.3.attn.head.0", "blocks.3.attn.head.2", "--class-index", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    t = pq.read_table(out / "heatmaps.parquet")
    assert t.column("image_id").to_pylist() == ["train/00000.png", "train/00001.png"]
    assert not (out / "segmentation.parquet").exists()
    ranking = tmp_path / "retrieval.parquet"
    pq.write_table(pa.table({"rank": [1, 0, 2], "image_id": ["train/00003.png", "train/00005.png", "train/00000.png"]}),
                   ranking)
    r = run_heatmap(HeatmapConfig(store=stores["vit"], out=str(tmp_path / "ranked"), retrieval=str(ranking), top_n=2,
                               components=["blocks.3.attn.head.0"], class_index="0"))
    assert r["ids"] == ["train/00005.png", "train/00003.png"]
    base = dict(store=stores["vit"], out=str(tmp_path / "e"), components=["blocks.3.attn.head.0"])
    with pytest.raises(InputError, match=r"not in .*close to 'train/00009\.png'"):
        run_heatmap(HeatmapConfig(**base, image_ids=["train/00009.png"], class_index=0))
    with pytest.raises(InputError, match=r"unknown component 'blocks\.3\.attn\.head\.9'"):
        run_heatmap(HeatmapConfig(**{**base, "components": ["blocks.3.attn.head.9"]}, class_index=0))
    with pytest.raises(InputError, match="unknown component 'blocks.0.attn.head.0'"):     # folded into embed
        run_heatmap(HeatmapConfig(**{**base, "components": ["blocks.0.attn.head.0"]}, class_index=0))
    with pytest.raises(InputError, match="exactly one of a text"):
        run_heatmap(HeatmapConfig(**base, class_index=0, text="a red circle"))
    with pytest.raises(InputError, match="exactly one of a text"):
        run_heatmap(HeatmapConfig(**base))
    with pytest.raises(InputError, match="either image ids or top_n"):
        run_heatmap(HeatmapConfig(**base, class_index=0, image_ids=["train/00000.png"], top_n=2))
    with pytest.raises(InputError, match="a class number"):
        run_heatmap(HeatmapConfig(**base, class_index="first"))
    with pytest.raises(InputError, match="aligner"):
        run_heatmap(HeatmapConfig(**base, text="a red circle"))
    with pytest.raises(InputError, match="no classifier head"):
        run_heatmap(HeatmapConfig(store=stores["clip"], out=str(tmp_path / "f"),
                               components=["transformer.resblocks.3.attn"],
                               class_index=0))
    ckpt = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(ckpt))
    with pytest.raises(InputError, match="made without a checkpoint"):
        run_heatmap(HeatmapConfig(**base, class_index=0, checkpoint=str(ckpt)))
    with pytest.raises(InputError, match="no mask for image"):
        run_heatmap(HeatmapConfig(**base, class_index=0, masks_dir=str(tmp_path)))
    (tmp_path / "small" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small" / "train" / "00000.png")
    with pytest.raises(InputError, match="is 10x10 but the image is 64x64"):
        run_heatmap(HeatmapConfig(**base, class_index=0, image_ids=["train/00000.png"], masks_dir=str(tmp_path / "small")))


@pytest.mark.slow
def test_heatmap_refuses_a_source_image_that_changed(stores, tmp_path):
    img = stores["clip_images"] / "train/00005.png"
    original = img.read_bytes()
    try:
        arr = np.asarray(Image.open(img)).copy()
        Image.fromarray(255 - arr).save(img)
        with pytest.raises(InputError, match="does not reproduce the stored readout"):
            run_heatmap(HeatmapConfig(store=stores["clip"], out=str(tmp_path / "x"), image_ids=["train/00005"],
                                   components=["transformer.resblocks.3.attn.head.0"], text="a red circle",
                                   cache_dir=str(tmp_path / "cache")))
    finally:
        img.write_bytes(original)
