"""``vitdecomp query heatmap``: token heatmaps of chosen images and heads of a store, overlays and (with
masks) segmentation metrics. The maths is in :mod:`vitdecomp.query.heatmaps`."""
from __future__ import annotations

import io
import logging
import os
from typing import Optional, Union

import numpy as np
import torch

from ..config import HeatmapConfig, OptionError, parse_blocks
from ..errors import InputError
from ..io import OutputDir, open_output
from .heatmaps import (METRICS, THRESHOLD_RULE, _aligner_map, _classifier, _safe, class_direction, compute_heatmaps,
                       expand_components, find_mask_file, grid_png, mask_to_input, overlay_png, predicted_classes,
                       read_image, rebuild_model, segmentation_metrics, summarise, to_display, upsample)

log = logging.getLogger(__name__)


def _select_ids(cfg: HeatmapConfig, st) -> list[str]:
    import difflib

    if cfg.image_ids and (cfg.top_n is not None or cfg.retrieval):
        raise OptionError("image_ids", "pass either image ids or top_n/retrieval, not both")
    all_ids = st.ids()
    if cfg.image_ids:
        ids = [str(i) for i in cfg.image_ids]
        have = set(all_ids)
        missing = [i for i in ids if i not in have]
        if missing:
            close = difflib.get_close_matches(missing[0], all_ids, n=3)
            raise InputError(f"image ids {missing[:5]} are not in {st.uri} ({len(all_ids)} images); "
                             f"close to {missing[0]!r}: {close or 'none'}")
        return list(dict.fromkeys(ids))
    n = 8 if cfg.top_n is None else int(cfg.top_n)
    if n < 1:
        raise OptionError("top_n", f"must be positive, got {n}")
    if cfg.retrieval:
        import pyarrow.parquet as pq

        from ..io import resolve

        try:
            fs, path = resolve(cfg.retrieval, cfg.s3())
            t = pq.read_table(path, filesystem=fs)
        except (OSError, ValueError) as e:
            raise OptionError("retrieval", f"{cfg.retrieval!r}: {e}") from None
        if "image_id" not in t.column_names:
            raise OptionError("retrieval", f"{cfg.retrieval!r} has no image_id column (columns: {t.column_names})")
        rows = t.to_pylist()
        if "rank" in t.column_names:
            rows.sort(key=lambda r: r["rank"])
        ids = [r["image_id"] for r in rows][:n]
        missing = [i for i in ids if i not in set(all_ids)]
        if missing:
            raise OptionError("retrieval", f"lists ids {missing[:3]} that are not in {st.uri}: it was made from "
                             "another store")
        return ids
    return sorted(all_ids)[:n]


def _parse_class_index(value) -> Union[int, str, None]:
    if value is None:
        return None
    if str(value).strip().lower() in ("pred", "predicted"):
        return "pred"
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptionError("class_index", f"{value!r}: a class number (0, 1, …) or 'pred'") from None


def _directions(cfg: HeatmapConfig, st, lm, aligner, readouts: np.ndarray) -> tuple[np.ndarray, list, list[str]]:
    """Per image: direction ``[n, d]``, class index (or None) and a label of the target."""
    n = len(readouts)
    k = _parse_class_index(cfg.class_index)
    if k is not None:
        if k == "pred":
            ks = [int(c) for c in predicted_classes(lm, readouts)]
            return np.stack([class_direction(lm, c) for c in ks]), ks, [f"class {c} (predicted)" for c in ks]
        u = class_direction(lm, k)
        return np.repeat(u[None], n, 0), [k] * n, [f"class {k}"] * n
    u = _text_direction(cfg, st, lm, aligner)
    return np.repeat(u[None], n, 0), [None] * n, [f"text {cfg.text!r}"] * n


def _text_direction(cfg: HeatmapConfig, st, lm, aligner) -> np.ndarray:
    from ..fit.text import encode_texts, resolve_text_model

    if aligner is None and lm.library == "open_clip":
        if cfg.clip and cfg.clip != lm.name:
            raise InputError(f"the text model {cfg.clip} is not the CLIP space of these contributions ({lm.name}); "
                             "texts must be encoded by the same model")
        text_lm = lm                    # the store's own CLIP (same weights, seed included)
    else:
        text_lm = resolve_text_model(st, aligner, cfg, what="a text heatmap")
    return encode_texts(text_lm, [cfg.text], cache_dir=cfg.text_cache)[0].astype(np.float64)


def _load_masks(cfg: HeatmapConfig, rows: list[dict], s3) -> Optional[list]:
    """The mask images (PIL, source resolution) of ``rows``, or None without mask options."""
    from PIL import Image

    if not (cfg.mask_column or cfg.masks_dir):
        return None
    out = []
    for r in rows:
        try:
            if cfg.mask_column:
                v = r[cfg.mask_column]
                if v is None:
                    raise InputError(f"image {r['image_id']!r} has no mask in column {cfg.mask_column!r}")
                img = Image.open(io.BytesIO(v)) if isinstance(v, (bytes, bytearray)) else read_image(str(v), s3)
            else:
                p = find_mask_file(cfg.masks_dir, r["image_id"])
                if p is None:
                    raise InputError(f"no mask for image {r['image_id']!r} in {cfg.masks_dir} (expected "
                                     f"{os.path.join(cfg.masks_dir, r['image_id'] + '.png')})")
                img = Image.open(p)
            img.load()
            out.append(img)
        except (OSError, FileNotFoundError) as e:
            raise InputError(f"cannot read the mask of {r['image_id']!r}: {e}") from None
    return out


def run_heatmap(cfg: HeatmapConfig) -> dict:
    """``vitdecomp query heatmap``: token heatmaps of chosen images and components, overlays and
    (with masks) segmentation metrics. Returns the tables, the maps and the output paths."""
    import pyarrow as pa

    from ..fit.compalign import Aligner, check_compatible
    from ..store import arrow_to_vectors, open_store

    cfg.check_required()
    if (cfg.text is None) == (cfg.class_index is None):
        raise OptionError("text", "pass exactly one of a text (a CLIP text direction) and a class index (a classifier row)")
    if cfg.class_index is not None and cfg.aligner:
        raise OptionError("aligner", "a class index projects on the model's own classifier; an aligner (CLIP "
                                     "space) goes with a text only")
    _parse_class_index(cfg.class_index)
    if cfg.mask_column and cfg.masks_dir:
        raise OptionError("masks_dir", "pass either a mask column or a masks directory, not both")
    st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
    m = st.manifest
    s3 = cfg.s3()
    opts = m["options"]
    blocks, convention, normalize = parse_blocks(opts.get("blocks")), opts.get("convention", "centered"), \
        bool(opts.get("normalize"))
    if cfg.mask_column and cfg.mask_column not in st.schema().names:
        raise OptionError("mask_column", f"{cfg.mask_column!r} is not a column of {st.uri} "
                         f"(columns: {[c for c in st.schema().names if not c.startswith('c_')]})")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = rebuild_model(m, cfg.checkpoint, device)
    groups = expand_components(lm, list(cfg.components), blocks)        # unknown names fail before any work
    aligner = Aligner.load(cfg.aligner, s3) if cfg.aligner else None
    if aligner is not None:
        check_compatible(aligner, st)
        for name, hs in groups.items():
            for h in hs:
                _aligner_map(aligner, h, name)
    if cfg.class_index is not None:
        _classifier(lm)                                                  # no classifier: fail before reading
    ids = _select_ids(cfg, st)
    cols = ["image_id", "uri", "readout"] + ([cfg.mask_column] if cfg.mask_column else [])
    table = st.read(columns=cols, ids=ids)
    by_id = {r["image_id"]: r for r in table.select([c for c in cols if c != "readout"]).to_pylist()}
    stored = dict(zip(table.column("image_id").to_pylist(), arrow_to_vectors(table.column("readout"), np.float64)))
    rows = [by_id[i] for i in ids]
    for r in rows:
        if not r["uri"]:
            raise InputError(f"image {r['image_id']!r} has no source URI in {st.uri} (it was read from a bytes "
                             "column): heatmaps recompute tokens from the source images")
    mask_imgs = _load_masks(cfg, rows, s3)
    directions, classes, targets = _directions(cfg, st, lm, aligner, np.stack([stored[i] for i in ids]))
    target = targets[0] if len(set(targets)) == 1 else "each image's predicted class"

    out = open_output(cfg.out, s3)
    out.makedirs("heatmaps")
    # fp16 storage, or TF32 convolutions on a GPU, move the readout by ~1e-3; a different model or image by O(1)
    tol = 2e-2 if m.get("dtype") == "fp16" or str(device).startswith("cuda") else 1e-3
    maps, ups, disp, pngs, masks = [], [], [], [], None if mask_imgs is None else []
    bs = max(1, int(cfg.batch_size))
    for s in range(0, len(rows), bs):
        chunk = rows[s:s + bs]
        try:
            srcs = [read_image(r["uri"], s3) for r in chunk]
        except (OSError, FileNotFoundError) as e:
            raise InputError(f"cannot read a source image of {[r['image_id'] for r in chunk]}: {e}") from None
        x = torch.stack([lm.transform(im) for im in srcs]).to(device)
        for j, (r, im) in enumerate(zip(chunk, srcs)):
            if mask_imgs is not None:
                mk = mask_imgs[s + j]
                if mk.size != im.size:
                    raise InputError(f"the mask of {r['image_id']!r} is {mk.size[0]}x{mk.size[1]} but the image is "
                                     f"{im.size[0]}x{im.size[1]}: masks must have the source image's size")
                masks.append(mask_to_input(mk, lm))
        res = compute_heatmaps(lm, x, list(cfg.components), directions[s:s + bs], aligner, convention, blocks,
                               normalize)
        for j, r in enumerate(chunk):
            z_s = stored[r["image_id"]]
            err = float(np.linalg.norm(res.readout[j] - z_s) / max(np.linalg.norm(z_s), 1e-30))
            if err > tol:
                raise InputError(f"the rebuilt {m['model']['name']} does not reproduce the stored readout of image "
                                 f"{r['image_id']!r} (relative difference {err:.2e} > {tol:g}): the weights, "
                                 "preprocessing or source image differ from those the store was made with")
        up = upsample(res.maps, x.shape[-2:])
        for j, r in enumerate(chunk):
            maps.append(res.maps[j])
            ups.append(up[j])
            disp.append(to_display(x[j], lm.preprocess))
    seg_rows = []
    for i, r in enumerate(rows):
        mk = masks[i] if masks is not None else None
        met = segmentation_metrics(ups[i], mk) if mk is not None else None
        if met is not None:
            seg_rows.append({"image_id": r["image_id"], **met})
        title = f"{r['image_id']} — {targets[i]}" + (f" — mIoU {met['miou']:.2f} AP {met['ap']:.2f}" if met else "")
        rel = f"heatmaps/{i:04d}_{_safe(r['image_id'])}.png"
        out.write_bytes(rel, overlay_png(disp[i], ups[i], title, mask=mk))
        pngs.append(rel)
    grid_path = out.write_bytes("heatmap_grid.png", grid_png(
        disp[:32], ups[:32], [r["image_id"] for r in rows[:32]],
        f"{m['model']['name']}: {' + '.join(cfg.components)} on {target}"))
    gh, gw = maps[0].shape
    peaks = [divmod(int(np.argmax(mp)), gw) for mp in maps]
    comp_set = list(cfg.components)
    out_cols = {
        "image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows],
        "components": pa.array([comp_set] * len(rows), pa.list_(pa.string())),
        "target": targets, "text": [cfg.text] * len(rows),
        "class_index": pa.array(classes, pa.int64()),
        "grid_h": [gh] * len(rows), "grid_w": [gw] * len(rows),
        "heatmap": pa.array([mp.ravel().tolist() for mp in maps], pa.list_(pa.float64())),
        "peak_row": [p[0] for p in peaks], "peak_col": [p[1] for p in peaks],
        "png": pngs,
    }
    for k in METRICS:
        out_cols[k] = pa.array([sr[k] for sr in seg_rows] if masks is not None else [None] * len(rows), pa.float64())
    heat_table = pa.table(out_cols)
    out.write_parquet("heatmaps.parquet", heat_table)
    seg_table, summary = None, None
    if masks is not None:
        summary = summarise(seg_rows)
        keep = ["image_id", *METRICS, "threshold", "foreground_fraction"]
        recs = [{"kind": "image", **{k: sr[k] for k in keep}} for sr in seg_rows]
        recs.append({"kind": "mean", "image_id": None, **{k: summary[f"mean_{k}"] for k in METRICS},
                     "threshold": None, "foreground_fraction": float(np.mean([sr["foreground_fraction"]
                                                                              for sr in seg_rows]))})
        recs.append({"kind": "pooled", "image_id": None, "pixacc": summary["pooled_pixacc"],
                     "miou": summary["pooled_miou"], **{k: None for k in METRICS if k not in ("pixacc", "miou")},
                     "threshold": None, "foreground_fraction": None})
        seg_table = pa.Table.from_pylist(recs, schema=pa.schema(
            [("kind", pa.string()), ("image_id", pa.string())] + [(k, pa.float64()) for k in METRICS] +
            [("threshold", pa.float64()), ("foreground_fraction", pa.float64())]))
        out.write_parquet("segmentation.parquet", seg_table)
    meta = {"store": st.uri, "model": m["model"]["name"], "components": comp_set,
            "heads": {k: v for k, v in groups.items()}, "target": target, "aligner": cfg.aligner,
            "images": len(rows), "grid": [gh, gw], "threshold_rule": THRESHOLD_RULE, "segmentation": summary}
    out.write_json("heatmap.json", meta)
    _write_report_section(out, meta, "heatmap_grid.png", masks is not None)
    return {"table": heat_table, "segmentation": seg_table, "summary": summary, "maps": np.stack(maps),
            "upsampled": np.stack(ups), "ids": ids, "pngs": [out.uri(p) for p in pngs], "grid": grid_path,
            "target": target}


def _write_report_section(out: OutputDir, meta: dict, grid_rel: str, has_masks: bool) -> None:
    """The run's section of ``out/report.html``."""
    title = "Token heatmaps" + (" and zero-shot segmentation" if has_masks else "")
    summary = (f"{' + '.join(meta['components'])} of {meta['model']} projected on {meta['target']}, "
               f"per patch ({meta['grid'][0]}x{meta['grid'][1]}), upsampled and overlaid on {meta['images']} images.")
    facts = {"store": meta["store"], "components": ", ".join(meta["components"]), "target": meta["target"],
             "images": meta["images"]}
    tables = [{"path": "heatmaps.parquet", "caption": "one row per image (peak patch, PNG)", "max_rows": 20}]
    if has_masks:
        seg = meta["segmentation"]
        facts.update({"pixAcc (mean)": round(seg["mean_pixacc"], 4), "mIoU (mean)": round(seg["mean_miou"], 4),
                      "AP (mean)": round(seg["mean_ap"], 4), "mAP fg/bg (mean)": round(seg["mean_map"], 4),
                      "threshold": THRESHOLD_RULE})
        tables.append({"path": "segmentation.parquet", "caption": "per-image segmentation metrics, mean and pooled",
                       "max_rows": 40})
    images = [{"path": grid_rel, "caption": "image | heatmap overlay"}]
    from .report import write_report, write_section

    write_section(out, "heatmap", title, order=60, summary=summary, facts=facts, images=images, tables=tables)
    write_report(out)
