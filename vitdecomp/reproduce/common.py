"""Helpers the reproduce experiments share: the model set (short aliases → timm/open_clip names, weights
tags and the published component sets), dataset errors that name the expected path and the dataset's
source, the decompose step, the toy-world marker, and the results table (published next to measured)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import OptionError
from ..errors import InputError

log = logging.getLogger(__name__)

# published ViT-L/14 CLIP (TextSpan experiments: the heads of its last four blocks) besides the models'
# reference layouts (vitdecomp.models.REFERENCE_LAYOUTS: deit_b, dino_b, dinov2_b, clip_b16, swin_b, maxvit_s)
EXTRA_ALIASES = {"clip_l14": ("open_clip:ViT-L-14", "laion2b_s32b_b82k", range(20, 24))}
TEACHER = ("open_clip:ViT-L-14", "laion2b_s32b_b82k")      # the published CompAlign teacher


class DatasetError(InputError):
    """A dataset file or folder is missing or malformed: names the path expected and where the dataset comes from."""

    def __init__(self, path: str, problem: str, source: str):
        self.path = path
        super().__init__(f"{path}: {problem}. {source}")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a reproduce run: ``key`` (alias or sanitised name) names its store and outputs."""

    key: str
    name: str                       # timm:<arch> or open_clip:<arch>, without a weights tag
    pretrained: Optional[str]       # weights tag (downloaded), or None with a checkpoint
    checkpoint: Optional[str]
    blocks: object                  # None (all), a range of indices, or the path of the first decomposed block

    @property
    def is_clip(self) -> bool:
        return self.name.startswith("open_clip:")


def aliases() -> dict:
    """Short name → (model, weights tag, published blocks)."""
    from ..models import REFERENCE_LAYOUTS

    out = {k: (v.model, v.pretrained, v.blocks) for k, v in REFERENCE_LAYOUTS.items()}
    out.update(EXTRA_ALIASES)
    return out


def resolve_models(cfg, default: Sequence[str]) -> list[ModelSpec]:
    """The run's models from ``--model``/``--models`` (default: the experiment's published set), each with
    its weights: ``--pretrained`` (the alias's published tag, a timm ``name.tag`` or ``--pretrained-tag``)
    or ``--checkpoint`` (one model). Fails before any work when a model has no weights."""
    from ..models import check_name

    names = cfg.model_list() or list(default)
    if cfg.checkpoint and len(names) != 1:
        raise OptionError("checkpoint", f"a checkpoint belongs to one model; {len(names)} were asked for "
                                        f"({', '.join(names)}): pass --model")
    known = aliases()
    specs = []
    for n in names:
        if n in known:
            name, tag, blocks = known[n]
            key = n
        elif n.startswith(("timm:", "open_clip:")):
            name, tag, blocks = n, None, None
            lib, _, arch = n.partition(":")
            if lib == "timm" and "." in arch:
                name, tag = f"timm:{arch.partition('.')[0]}", arch.partition(".")[2]
            tag = cfg.pretrained_tag or tag
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", arch)
        else:
            import difflib

            raise OptionError("models", f"unknown model {n!r}: use a short name ({', '.join(sorted(known))}) or a "
                                        f"full name timm:<model>[.<tag>] / open_clip:<architecture>"
                              + (f"; did you mean {difflib.get_close_matches(n, list(known), n=2)}?"
                                 if difflib.get_close_matches(n, list(known), n=2) else ""))
        if cfg.checkpoint:
            tag = None
        elif not cfg.pretrained:
            raise OptionError("pretrained", f"{n}: the published numbers need trained weights: pass --pretrained "
                                            "(downloads the published weights) or --checkpoint FILE (local weights)")
        elif not tag:
            raise OptionError("pretrained_tag", f"{n}: name the weights to download (timm:<model>.<tag>, or "
                                                "--pretrained-tag TAG)")
        check_name(name, tag)
        specs.append(ModelSpec(key, name, tag, cfg.checkpoint, blocks))
    if len({s.key for s in specs}) != len(specs):
        raise OptionError("models", f"a model is listed twice: {names}")
    return specs


def blocks_option(spec: ModelSpec) -> Optional[str]:
    """The decompose job's ``blocks`` option for the spec's published blocks (a block path → its index)."""
    b = spec.blocks
    if b is None:
        return None
    if isinstance(b, range):
        return f"{b.start}-{b.stop - 1}"
    from ..engine import block_paths
    from ..models import load_model

    paths = block_paths(load_model(spec.name, pretrained=spec.pretrained or False, load_weights=False).model)
    if b not in paths:
        raise InputError(f"{spec.name}: no block {b!r} (blocks: {paths[:3]} …)")
    return f"{paths.index(b)}-{len(paths) - 1}"


def marker(root: str) -> Optional[dict]:
    """The toy-world marker of an exported folder (its models' names registered), or None."""
    from ..toyworld.export import read_marker

    m = read_marker(root)
    if m is not None:
        import importlib

        importlib.import_module("vitdecomp.toyworld")          # registers the toy architectures
        log.info("%s is an exported toy world: its planted-truth expectations replace the published numbers", root)
    return m


def write_properties(marker_: Optional[dict], out: str, given: Optional[str]) -> Optional[str]:
    """``given``, else the toy world's properties written as ``out/properties.yaml`` (toy exports), else None."""
    if given or not marker_ or not marker_.get("properties"):
        return given
    import yaml

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "properties.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(marker_["properties"], f)
    return path


def write_inputs(rows: list[dict], path: str) -> str:
    """The decompose input table (``image_id``, ``uri`` and pass-through columns) as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def decompose(cfg, spec: ModelSpec, inputs: str, store: str, *, heads: bool = True, all_blocks: bool = False,
              teacher: Optional[tuple] = None):
    """Run the decompose job for one model over the input table (resumable: a rerun skips stored ids).
    ``teacher`` = (name, weights tag, checkpoint) adds the CLIP teacher column CompAlign needs."""
    from ..config import DecomposeConfig
    from ..pipeline import run_decompose

    t_name, t_tag, t_ck = teacher or (None, None, None)
    dc = DecomposeConfig(input=inputs, output=store, model=spec.name, pretrained=spec.pretrained,
                         checkpoint=spec.checkpoint, source="table", uri_column="uri", id_column="image_id",
                         blocks=None if all_blocks else blocks_option(spec), heads=heads, dtype=cfg.dtype,
                         batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_cpus=cfg.num_cpus,
                         device=cfg.device, ray_address=cfg.ray_address, seed=cfg.seed, teacher=t_name,
                         teacher_pretrained=t_tag, teacher_checkpoint=t_ck)
    summary = run_decompose(dc)
    log.info("%s", summary)
    if summary.errors:
        log.warning("%s: %d images could not be decoded (see the store's errors table); they are left out",
                    spec.key, summary.errors)
    return summary


def row(experiment: str, model: str, metric: str, published, measured: float, marker_: Optional[dict] = None,
        key: Optional[str] = None) -> dict:
    """One line of the results table. On an exported toy world, ``published`` is replaced by the marker's
    planted-truth expectation for ``key`` (or '—')."""
    if marker_ is not None:
        ref = (marker_.get("expected") or {}).get(key or metric, "—")
        return {"experiment": experiment, "model": model, "metric": metric, "published": None,
                "reference": f"toy world: {ref}", "measured": float(measured)}
    return {"experiment": experiment, "model": model, "metric": metric,
            "published": None if published is None else float(published),
            "reference": "—" if published is None else f"{published:.4f}", "measured": float(measured)}


def write_results(out: str, experiment: str, rows: list[dict], extra: dict) -> dict:
    """``out/reproduce-<experiment>.parquet`` and ``.json``; returns their paths."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    schema = pa.schema([("experiment", pa.string()), ("model", pa.string()), ("metric", pa.string()),
                        ("published", pa.float64()), ("reference", pa.string()), ("measured", pa.float64())])
    pq_path = os.path.join(out, f"reproduce-{experiment}.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), pq_path)
    js = os.path.join(out, f"reproduce-{experiment}.json")
    with open(js, "w") as f:
        json.dump({"experiment": experiment, "rows": rows, **extra}, f, indent=2, default=str)
    return {"parquet": pq_path, "json": js}


def format_table(rows: list[dict]) -> str:
    """The results as a fixed-width text table: experiment, model, metric, published (or the toy
    world's expectation), measured."""
    head = ("experiment", "model", "metric", "published", "measured")
    cells = [head] + [(r["experiment"], r["model"], r["metric"], r["reference"], f"{r['measured']:.4f}") for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = ["  ".join(str(c[i]).ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)
