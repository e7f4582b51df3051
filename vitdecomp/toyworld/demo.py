"""``vitdecomp demo``: the one-command offline demo on the built-in toy world (README “The toy world”).

Stages: generate the world → train (or load from cache) the tiny classifier and tiny CLIP → report
their planted-truth accuracies → decompose both over the world with the decompose job (local Ray,
local Lance; the classifier's store carries the tiny CLIP's embedding as its teacher) → fit
(CompAlign, TextSpan) → query (CompAttribute, spurious mitigation, ablation curves, retrieval by
text and by image, token heatmaps with segmentation metrics) → one HTML report per store.
``--quick`` instead decomposes one drawn image with a random-initialised model (seconds).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Optional

from ..errors import InputError


log = logging.getLogger(__name__)
WORLD_PROPERTIES = {
    "world color": ["red color", "yellow color", "green color", "cyan color", "blue color", "pink color"],
    "world background": ["a shape on ocean", "a shape on lake", "a shape on forest", "a shape on desert"],
    "world shape": ["a circle", "a square", "a triangle", "a cross"],
    "world texture": ["a striped shape", "a dotted shape", "a plain shape"],
}


def example_image(size: int = 224):
    """A drawn RGB image (no files, no downloads): a red disc on a blue-green background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 120, 140))
    draw = ImageDraw.Draw(img)
    draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 40, 30))
    draw.rectangle([0, 3 * size // 4, size, size], fill=(90, 160, 60))
    return img


def quick(model: str = "timm:deit_tiny_patch16_224", top: int = 10, seed: int = 0,
          progress: Optional[Callable[[str], None]] = None) -> dict:
    """Decompose one drawn image with a random-initialised ``model``; ``progress`` receives the lines."""
    from ..engine import decompose
    from ..models import load_model

    say = progress or log.info
    lm = load_model(model, pretrained=False, seed=seed)
    x = lm.transform(example_image(lm.image_size[0]))[None]
    d = decompose(lm, x)
    say(f"model {lm.name} (random init), readout {lm.readout.kind} d={lm.readout.dim}, {len(d.names)} components")
    say(f"reconstruction error ||sum c_k - z|| / ||z|| = {float(d.residual()[0]):.2e}")
    say(f"largest components along the readout direction (terms sum to ||z|| = {float(d.readout[0].norm()):.3f}):")
    for name, score in d.top(0, n=top):
        say(f"  {name:<28s} {score:+.4f}")
    return {"decomposition": d, "model": lm}


def run(workdir: str = ".vitdecomp-demo", small: bool = False, seed: int = 0, num_cpus=None,
        progress: Optional[Callable[[str], None]] = None, retrain: bool = False,
        export_weights: Optional[str] = None) -> dict:
    """The whole demo; returns what it produced (paths, figures and the ``stages`` it went through).
    ``progress`` receives one line per stage and finding (default: the module's logger).

    The tiny models are the ones shipped with the package when they fit the world and training config
    (the default world and ``seed=0``; ``small`` worlds too), else trained here (cached). ``retrain``
    trains them here even then; ``export_weights`` (a directory) writes the trained models as shipped
    weights with their figures and the reduced-schedule check (what ``--retrain --export-weights`` does)."""
    from ..config import CompAlignConfig, DecomposeConfig, TextSpanConfig
    from ..fit.jobs import run_compalign, run_textspan
    from ..models import load_model
    from ..pipeline import run_decompose as decompose
    from ..store import open_store
    from .generate import WorldConfig, generate, vocabulary_pool
    from .registry import TOY_CLIP, TOY_VIT
    from .train import (TrainConfig, cached_models, ensure_models, export_weights as export, group_accuracy,
                        record_figures, reduced_schedule_figures, shipped_models, zero_shot_accuracy)

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    if export_weights and (small or not retrain):
        raise InputError("export_weights needs retrain=True and the full world (not small): the shipped weights "
                         "are trained on the default world")
    world_cfg = WorldConfig(seed=seed, n_train=240, n_val=60, n_test=60) if small else WorldConfig(seed=seed)
    # a small world uses the shipped models (trained on the full world); retraining one is a smoke test
    train_cfg = TrainConfig(seed=seed, classifier_epochs=2, clip_epochs=2) if small and retrain else TrainConfig(seed=seed)
    stages: list[str] = []
    say = progress or log.info
    stage = _Stages(say, stages)

    with stage("1/7 generate the toy world"):
        world = os.path.join(workdir, f"world-{world_cfg.key()}")
        meta = generate(world, world_cfg)
        say(f"    {world_cfg.n_train}/{world_cfg.n_val}/{world_cfg.n_test} train/val/test images in {world}")

    with stage("2/7 load (or train) the tiny classifier and tiny CLIP"):
        cache_dir = os.path.join(workdir, "cache")
        if not retrain and shipped_models(world_cfg, train_cfg) is None and not cached_models(world, world_cfg, cache_dir,
                                                                                             train_cfg):
            say("    no shipped weights for this world/seed: training both models here (about 6 minutes on 2 idle "
                "cores, longer on a busy machine; cached afterwards)")
        models = ensure_models(world, world_cfg.key(), cache_dir, train_cfg, world_cfg=world_cfg, retrain=retrain)
        for k, v in models.items():
            how = ("shipped with vitdecomp; `vitdecomp demo --retrain` trains it here" if v.get("shipped")
                   else "cached" if v["cached"] else f"trained in {v['seconds']:.0f} s")
            say(f"    {k}: {v['checkpoint']} — {how}")
        if export_weights:
            export(models, world_cfg, train_cfg, export_weights)
            models = shipped_models(world_cfg, train_cfg, export_weights)
            say(f"    exported as shipped weights (fp16) to {export_weights}; figures below are measured with them")

    with stage("3/7 planted-truth accuracies (test split)"):
        clf = load_model(TOY_VIT, checkpoint=models["classifier"]["checkpoint"])
        clip = load_model(TOY_CLIP, checkpoint=models["clip"]["checkpoint"])
        groups = group_accuracy(clf, world)
        zs = zero_shot_accuracy(clip, world)
        say(f"    classifier accuracy {groups['accuracy']:.3f}, worst group {groups['worst_group']:.3f}, "
              f"groups {json.dumps({g: round(a, 3) for g, a in groups['groups'].items()})}")
        say(f"    tiny CLIP zero-shot accuracy per attribute: {json.dumps({a: round(v, 3) for a, v in zs.items()})}")
        rec = models["classifier"]
        if rec.get("shipped") and "accuracy" in rec and not small and not export_weights:
            say(f"    (recorded with the shipped weights: accuracy {rec['accuracy']:.3f}, worst group "
                f"{rec['worst_group']:.3f})")
        if export_weights:
            say("    measuring the reduced-schedule retraining check recorded with the weights ...")
            reduced = reduced_schedule_figures(world, seed, os.path.join(workdir, "cache", "reduced"))
            record_figures(export_weights, {"classifier": {k: groups[k] for k in ("accuracy", "worst_group", "groups")},
                                            "clip": {"zero_shot": zs}}, reduced)
            say(f"    recorded in {os.path.join(export_weights, 'weights.json')}")

    stores = {}
    with stage("4/7 decompose both models over the world (local Ray, Lance)"):
        common = dict(input=meta, uri_column="uri", id_column="image_id", batch_size=64, commit_every=512,
                      num_cpus=num_cpus, dtype="fp32")
        stores["classifier"] = os.path.join(workdir, "stores", "classifier")
        decompose(DecomposeConfig(output=stores["classifier"], model=TOY_VIT, checkpoint=models["classifier"]["checkpoint"],
                                  teacher=TOY_CLIP, teacher_checkpoint=models["clip"]["checkpoint"], **common))
        stores["clip"] = os.path.join(workdir, "stores", "clip")
        decompose(DecomposeConfig(output=stores["clip"], model=TOY_CLIP, checkpoint=models["clip"]["checkpoint"],
                                  **common))
        for name, uri in stores.items():
            st = open_store(uri)
            say(f"    {name}: {st.count()} rows x {len(st.names)} components (d={st.manifest['d']}) in {uri}")

    fits = {}
    with stage("5/7 fit: CompAlign (classifier -> tiny CLIP) and TextSpan"):
        pool_path = os.path.join(workdir, "world-pool.txt")
        with open(pool_path, "w") as f:
            f.write("\n".join(vocabulary_pool()) + "\n")
        fits["aligner"] = os.path.join(workdir, "fit", "classifier-compalign")
        fits["compalign"] = run_compalign(CompAlignConfig(store=stores["classifier"], out=fits["aligner"],
                                                       max_epochs=3 if small else 15, lr=1e-3))
        cache = os.path.join(workdir, "cache", "text")
        for name, extra in (("clip", {}), ("classifier", {"aligner": fits["aligner"]})):
            out = os.path.join(workdir, "fit", f"textspan-{name}")
            run_textspan(TextSpanConfig(store=stores[name], out=out, pool=pool_path, texts_per_head=5, rank=32,
                                     clip_checkpoint=models["clip"]["checkpoint"], cache_dir=cache, **extra))
            fits[f"textspan_{name}"] = out
    queries = {}
    with stage("6/7 query: CompAttribute, spurious mitigation, ablation, retrieval, heatmaps"):
        queries = _query_stage(workdir, world, world_cfg, stores, models, fits, small)
        fits.update({f"compattribute_{k}": queries["out"][k] for k in ("clip", "classifier")})

    with stage("7/7 report"):
        for name, out in queries["out"].items():
            say(f"    {name}: {os.path.join(out, 'report.html')}")

    summary = {"workdir": workdir, "world": world, "metadata": meta, "models": models, "stores": stores, "fits": fits,
               "classifier_groups": groups, "clip_zero_shot": zs, "queries": queries.get("summary", {}),
               "reports": {k: os.path.join(v, "report.html") for k, v in queries.get("out", {}).items()},
               "seconds": time.time() - t0, "stages": stages, "query_dirs": queries.get("out", {})}
    summary["index"] = write_index(workdir, summary)
    with open(os.path.join(workdir, "demo-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    say(f"demo done in {summary['seconds']:.0f} s; outputs under {workdir} (summary: demo-summary.json)")
    say(f"open {summary['index']}: it links every report ({len(summary['all_reports'])}) and the key figures")
    for line in serve_commands(workdir, summary):
        say(line)
    return summary


def serve_commands(workdir: str, summary: dict) -> list[str]:
    """The ``vitdecomp serve`` command for each of the demo's stores (the explorer)."""
    models, fits, stores = summary["models"], summary["fits"], summary["stores"]
    props = os.path.join(workdir, "world-properties.yaml")
    clip_ck = models["clip"]["checkpoint"]
    out = summary.get("query_dirs", {})
    lines = ["explore the stores in a browser (one command each; http://127.0.0.1:8000):"]
    for name, extra in (("clip", ""), ("classifier", f" --aligner {fits['aligner']} --clip-checkpoint {clip_ck}")):
        ck = models[name]["checkpoint"]
        query = f" --query {out[name]}" if name in out else ""
        lines.append(f"  vitdecomp serve --store {stores[name]} --fit {fits[f'textspan_{name}']}{query} "
                     f"--checkpoint {ck} --properties {props}{extra}")
    return lines


def reports_under(workdir: str) -> list[str]:
    """Every ``report.html`` the demo wrote (queries and fits), sorted."""
    found = []
    for top in ("query", "fit"):
        for root, _, files in os.walk(os.path.join(workdir, top)):
            found += [os.path.join(root, f) for f in files if f == "report.html"]
    return sorted(found)


def write_index(workdir: str, summary: dict) -> str:
    """``workdir/index.html``: links to every report the demo wrote, with the planted-truth figures."""
    import html

    from ..query.report import _CSS, format_value

    reports = reports_under(workdir)
    summary["all_reports"] = reports
    esc = html.escape
    items = "".join(f'<li><a href="{esc(os.path.relpath(r, workdir))}">{esc(os.path.relpath(os.path.dirname(r), workdir))}'
                    f"</a></li>" for r in reports)
    facts = {"classifier accuracy (test)": summary["classifier_groups"]["accuracy"],
             "classifier worst-group accuracy (test)": summary["classifier_groups"]["worst_group"],
             "tiny CLIP zero-shot accuracy": summary["clip_zero_shot"]}
    for ranking in ("signed", "compattribute"):
        m = summary.get("queries", {}).get(f"mitigation_{ranking}")
        if m:
            facts[f"worst group after mitigation ({ranking} ranking)"] = m["worst_group"]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(format_value(v, 8, 400))}</dd>" for k, v in facts.items())
    stores = "".join(f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in summary["stores"].items())
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>vitdecomp demo</title>'
            f"<style>{_CSS}</style></head><body><header><h1>vitdecomp demo</h1>"
            f'<p class="meta">{esc(workdir)} — {summary["seconds"]:.0f} s</p></header><main>'
            f"<section><h2>Reports</h2><ol>{items}</ol></section>"
            f'<section><h2>Planted-truth figures</h2><dl class="facts">{rows}</dl></section>'
            f"<section><h2>Stores</h2><ul>{stores}</ul></section></main></body></html>\n")
    path = os.path.join(workdir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def _query_stage(workdir, world, world_cfg, stores, models, fits, small: bool) -> dict:
    """Every query subcommand on the demo's stores, each into one report per store."""
    import yaml

    from ..config import (AblateConfig, CompAttributeConfig, HeatmapConfig, InterpretabilityConfig, MitigateConfig,
                          RetrieveConfig)
    from ..query.heatmap_job import run_heatmap
    from ..query.jobs import run_ablate, run_compattribute, run_interpretability, run_mitigate, run_retrieve
    from .generate import write_masks

    props = os.path.join(workdir, "world-properties.yaml")
    with open(props, "w") as f:
        yaml.safe_dump(WORLD_PROPERTIES, f)
    cache = os.path.join(workdir, "cache", "text")
    ck = {"clip": models["clip"]["checkpoint"], "classifier": models["classifier"]["checkpoint"]}
    out = {k: os.path.join(workdir, "query", k) for k in ("clip", "classifier")}
    for d in out.values():                       # a rerun rebuilds each report from this run's sections only
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.endswith(".section.json"):
                    os.remove(os.path.join(d, f))
    text = dict(clip_checkpoint=ck["clip"], cache_dir=cache)
    res = {}
    for name, extra in (("clip", {}), ("classifier", {"aligner": fits["aligner"]})):
        r = run_compattribute(CompAttributeConfig(store=stores[name], out=out[name], properties=props, **text, **extra))
        res[f"compattribute_{name}"] = {p: r["names"][int(r["scores"][:, j].argmax())]
                                        for j, p in enumerate(r["properties"]) if p.startswith("world")}
    # the classifier: its own head, the world's label and background, components chosen on val, scored on test
    common = dict(store=stores["classifier"], out=out["classifier"], label_column="label", class_names=["warm", "cool"],
                  head="model", checkpoint=ck["classifier"], aligner=fits["aligner"], properties=props,
                  group_column="background", split_column="split", fit_split=["val"], eval_split=["test"], k=5, **text)
    for ranking in ("compattribute", "signed"):
        r = run_mitigate(MitigateConfig(**common, ranking=ranking, spurious="world background", core="world color",
                                     name=f"mitigation_{ranking}"))
        res[f"mitigation_{ranking}"] = {"worst_group": r["summary"]["worst_group"],
                                        "mean_group": r["summary"]["mean_group"], "ablated": r["summary"]["ablated"]}
    r = run_ablate(AblateConfig(store=stores["classifier"], out=out["classifier"], label_column="label",
                             class_names=["warm", "cool"], head="model", checkpoint=ck["classifier"],
                             split_column="split", eval_split=["test"]))
    res["ablation_classifier"] = r["summary"]
    # the tiny CLIP: zero-shot scene ablation curves, retrieval by text and by image, heatmaps with masks
    r = run_ablate(AblateConfig(store=stores["clip"], out=out["clip"], label_column="scene", split_column="split",
                             eval_split=["test"], **text))
    res["ablation_clip"] = r["summary"]
    r = run_retrieve(RetrieveConfig(store=stores["clip"], out=out["clip"], property="world color", text="red color",
                                 properties=props, top_components=5, top_images=16, **text))
    res["retrieve_text"] = {"components": r["components"], "top": r["table"].column("image_id").to_pylist()[:8]}
    ri = os.path.join(out["clip"], "by-image")
    r = run_retrieve(RetrieveConfig(store=stores["clip"], out=ri, property="world background", image_ids=["test/00000"],
                                 properties=props, top_components=5, top_images=16, **text))
    res["retrieve_image"] = {"components": r["components"], "top": r["table"].column("image_id").to_pylist()[:8],
                             "report": os.path.join(ri, "report.html")}
    masks = write_masks(world, world_cfg, split="test")
    last = _last_block(stores["clip"])
    r = run_heatmap(HeatmapConfig(store=stores["clip"], out=out["clip"], checkpoint=ck["clip"], clip_checkpoint=ck["clip"],
                               components=[f"transformer.resblocks.{last}.attn"], text="a shape",
                               image_ids=[f"test/{i:05d}" for i in range(4 if small else 24)], masks_dir=masks,
                               cache_dir=cache))
    res["heatmap_clip"] = r.get("summary")
    # the classifier's last two attention layers on each image's predicted class: where it looks
    last = _last_block(stores["classifier"])
    r = run_heatmap(HeatmapConfig(store=stores["classifier"], out=out["classifier"], checkpoint=ck["classifier"],
                               components=[f"blocks.{last}.attn", f"blocks.{last - 1}.attn"], class_index="pred",
                               image_ids=[f"test/{i:05d}" for i in range(8 if small else 24)], masks_dir=masks))
    res["heatmap_classifier"] = r.get("summary")
    # interpretability scores from each model's TextSpan texts (labels per head, association, entanglement)
    for name in ("clip", "classifier"):
        r = run_interpretability(InterpretabilityConfig(textspan=fits[f"textspan_{name}"], out=out[name],
                                                        properties=props))
        res[f"interpretability_{name}"] = r["summary"]
    return {"out": out, "summary": res}


def _last_block(store: str) -> int:
    from ..store import open_store

    return max(c.block for c in open_store(store).components if c.block is not None)


class _Stages:
    """``with stage(title):`` reports the start and the duration of a stage and records its title."""

    def __init__(self, say: Callable[[str], None], record: list):
        self.say, self.record = say, record

    def __call__(self, title: str):
        import contextlib

        @contextlib.contextmanager
        def cm():
            t = time.time()
            self.record.append(title)
            self.say(f"[demo] {title} ...")
            yield
            self.say(f"[demo] {title}: done in {time.time() - t:.0f} s")
        return cm()
