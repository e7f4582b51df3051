"""``vitdecomp demo``: the one-command offline demo on the built-in toy world (SPEC §8).

Stages: generate the world → train (or load from cache) the tiny classifier and tiny CLIP → report
their planted-truth accuracies → decompose both over the world with the decompose job (local Ray,
local Lance; the classifier's store carries the tiny CLIP's embedding as its teacher) → fit and
query, as those stages land. It says which stages are not there yet. ``--quick`` instead decomposes
one drawn image with a random-initialised model (seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

log = logging.getLogger(__name__)
MISSING_STAGES = ("query: retrieval, ablation curves, spurious mitigation, token heatmaps, HTML report",)


def example_image(size: int = 224):
    """A drawn RGB image (no files, no downloads): a red disc on a blue-green background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 120, 140))
    draw = ImageDraw.Draw(img)
    draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 40, 30))
    draw.rectangle([0, 3 * size // 4, size, size], fill=(90, 160, 60))
    return img


def quick(model: str = "timm:deit_tiny_patch16_224", top: int = 10, seed: int = 0) -> dict:
    import vitdecomp as vd

    torch.manual_seed(seed)
    lm = vd.load_model(model, pretrained=False)
    x = lm.transform(example_image(lm.image_size[0]))[None]
    d = vd.decompose(lm, x)
    print(f"model {lm.name} (random init), readout {lm.readout.kind} d={lm.readout.dim}, {len(d.names)} components")
    print(f"reconstruction error ||sum c_k - z|| / ||z|| = {float(d.residual()[0]):.2e}")
    print(f"largest components along the readout direction (terms sum to ||z|| = {float(d.readout[0].norm()):.3f}):")
    for name, score in d.top(0, n=top):
        print(f"  {name:<28s} {score:+.4f}")
    return {"decomposition": d, "model": lm}


def run(workdir: str = ".vitdecomp-demo", small: bool = False, seed: int = 0, num_cpus=None) -> dict:
    """The whole demo; returns what it produced (paths and figures)."""
    import vitdecomp as vd
    from .decompose_job import DecomposeConfig
    from .decompose_job import run as decompose
    from .toyworld.generate import WorldConfig, generate
    from .toyworld.registry import TOY_CLIP, TOY_VIT
    from .toyworld.train import TrainConfig, ensure_models, group_accuracy, zero_shot_accuracy

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    if small:
        world_cfg = WorldConfig(seed=seed, n_train=240, n_val=60, n_test=60)
        train_cfg = TrainConfig(seed=seed, classifier_epochs=2, clip_epochs=2)
    else:
        world_cfg, train_cfg = WorldConfig(seed=seed), TrainConfig(seed=seed)
    stage = _Stages()

    with stage("1/6 generate the toy world"):
        world = os.path.join(workdir, f"world-{world_cfg.key()}")
        meta = generate(world, world_cfg)
        print(f"    {world_cfg.n_train}/{world_cfg.n_val}/{world_cfg.n_test} train/val/test images in {world}")

    with stage("2/6 train or load the tiny classifier and tiny CLIP"):
        models = ensure_models(world, world_cfg.key(), os.path.join(workdir, "cache"), train_cfg)
        for k, v in models.items():
            how = "cached" if v["cached"] else f"trained in {v['seconds']:.0f} s"
            print(f"    {k}: {v['checkpoint']} ({how})")

    with stage("3/6 planted-truth accuracies (test split)"):
        clf = vd.load_model(TOY_VIT, checkpoint=models["classifier"]["checkpoint"])
        clip = vd.load_model(TOY_CLIP, checkpoint=models["clip"]["checkpoint"])
        groups = group_accuracy(clf, world)
        zs = zero_shot_accuracy(clip, world)
        print(f"    classifier accuracy {groups['accuracy']:.3f}, worst group {groups['worst_group']:.3f}, "
              f"groups {json.dumps({g: round(a, 3) for g, a in groups['groups'].items()})}")
        print(f"    tiny CLIP zero-shot accuracy per attribute: {json.dumps({a: round(v, 3) for a, v in zs.items()})}")

    stores = {}
    with stage("4/6 decompose both models over the world (local Ray, Lance)"):
        common = dict(input=meta, uri_column="uri", id_column="image_id", batch_size=64, commit_every=512,
                      num_cpus=num_cpus, dtype="fp32")
        stores["classifier"] = os.path.join(workdir, "stores", "classifier")
        decompose(DecomposeConfig(output=stores["classifier"], model=TOY_VIT, checkpoint=models["classifier"]["checkpoint"],
                                  teacher=TOY_CLIP, teacher_checkpoint=models["clip"]["checkpoint"], **common))
        stores["clip"] = os.path.join(workdir, "stores", "clip")
        decompose(DecomposeConfig(output=stores["clip"], model=TOY_CLIP, checkpoint=models["clip"]["checkpoint"],
                                  **common))
        for name, uri in stores.items():
            st = vd.open_store(uri)
            print(f"    {name}: {st.count()} rows x {len(st.names)} components (d={st.manifest['d']}) in {uri}")

    fits = {}
    with stage("5/6 fit: CompAlign (classifier -> tiny CLIP) and TextSpan"):
        from .fit_job import CompAlignJob, TextSpanJob, run_compalign, run_textspan
        from .toyworld.generate import vocabulary_pool

        pool_path = os.path.join(workdir, "world-pool.txt")
        with open(pool_path, "w") as f:
            f.write("\n".join(vocabulary_pool()) + "\n")
        fits["aligner"] = os.path.join(workdir, "fit", "classifier-compalign")
        fits["compalign"] = run_compalign(CompAlignJob(store=stores["classifier"], out=fits["aligner"],
                                                       max_epochs=3 if small else 15, lr=1e-3))
        cache = os.path.join(workdir, "cache", "text")
        for name, extra in (("clip", {}), ("classifier", {"aligner": fits["aligner"]})):
            out = os.path.join(workdir, "fit", f"textspan-{name}")
            run_textspan(TextSpanJob(store=stores[name], out=out, pool=pool_path, texts_per_head=5, rank=32,
                                     clip_checkpoint=models["clip"]["checkpoint"], cache_dir=cache, **extra))
            fits[f"textspan_{name}"] = out
    with stage("6/6 query: CompAttribute of both models against the world's properties"):
        import yaml

        from .query_job import CompAttributeJob, run_compattribute

        props_path = os.path.join(workdir, "world-properties.yaml")
        with open(props_path, "w") as f:
            yaml.safe_dump({"world color": ["red color", "yellow color", "green color", "cyan color", "blue color",
                                            "pink color"],
                            "world background": ["a shape on ocean", "a shape on lake", "a shape on forest",
                                                 "a shape on desert"],
                            "world shape": ["a circle", "a square", "a triangle", "a cross"],
                            "world texture": ["a striped shape", "a dotted shape", "a plain shape"]}, f)
        cache = os.path.join(workdir, "cache", "text")
        for name, extra in (("clip", {}), ("classifier", {"aligner": fits["aligner"]})):
            out = os.path.join(workdir, "query", f"compattribute-{name}")
            run_compattribute(CompAttributeJob(store=stores[name], out=out, properties=props_path,
                                               clip_checkpoint=models["clip"]["checkpoint"], cache_dir=cache, **extra))
            fits[f"compattribute_{name}"] = out
        print("    not in this demo yet: " + "; ".join(MISSING_STAGES))

    summary = {"workdir": workdir, "world": world, "metadata": meta, "models": models, "stores": stores, "fits": fits,
               "classifier_groups": groups, "clip_zero_shot": zs, "seconds": time.time() - t0}
    with open(os.path.join(workdir, "demo-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"demo done in {summary['seconds']:.0f} s; outputs under {workdir} (summary: demo-summary.json)")
    return summary


class _Stages:
    def __call__(self, title: str):
        import contextlib

        @contextlib.contextmanager
        def cm():
            t = time.time()
            print(f"[demo] {title} ...", flush=True)
            yield
            print(f"[demo] {title}: done in {time.time() - t:.0f} s", flush=True)
        return cm()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo on the built-in toy world (no downloads)",
                       description="Generate the toy world, train or load its tiny classifier and CLIP, report "
                                   "their planted-truth accuracies and decompose both into Lance stores with the "
                                   "decompose job on a local Ray. Reruns reuse the cached world and models.")
    p.add_argument("--workdir", default=".vitdecomp-demo", help="where the world, models and stores go")
    p.add_argument("--small", action="store_true", help="a few hundred images and a few epochs (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="only decompose one drawn image with a random-init model")
    p.add_argument("--model", default="timm:deit_tiny_patch16_224", help="--quick: the model")
    p.set_defaults(func=lambda a: (quick(a.model) if a.quick else run(a.workdir, a.small, a.seed)) and None)
