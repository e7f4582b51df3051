"""Benchmarks that measure ratios in one run (`vitdecomp benchmark <name>` prints them).

``overhead``: plain forward vs. per-head decomposition of the same model on the same batch, in one
process, interleaved repetitions; median times, their ratio and peak memory of each mode.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch

from .engine import components_for, decompose, plan_for
from .models import load_model


def _peak_child(mode: str, model: str, batch: int, heads: bool, blocks, seed: int, q) -> None:
    """In a fresh process: build the model and batch, run ``mode`` once, report peak RSS growth."""
    import threading

    import psutil


    lm = load_model(model, pretrained=False, seed=seed)
    x = torch.randn(batch, 3, *lm.image_size)
    plan = plan_for(lm.vision)
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if mode == "plain":
        _no_grad(plan.readout, x)
    else:
        decompose(lm, x, heads=heads, blocks=blocks)
    done.set()
    t.join()
    q.put(max(peak, proc.memory_info().rss) - base)


def peak_memory(mode: str, model: str, batch: int, heads: bool = True, blocks=None, seed: int = 0,
                device: Optional[torch.device] = None) -> int:
    """Peak memory growth (bytes) of one call of ``mode`` ("plain" or "decompose").

    CUDA: ``torch.cuda.max_memory_allocated`` around the call. CPU: the call runs once in a fresh
    process (with glibc's mmap threshold at 64 KiB) and the growth of its resident set, sampled
    every millisecond, is reported; in one process the allocator's cached heap would hide peaks.
    """
    if device is not None and device.type == "cuda":
    
        lm = load_model(model, pretrained=False, device=device, seed=seed)
        x = torch.randn(batch, 3, *lm.image_size, device=device)
        plan = plan_for(lm.vision)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        if mode == "plain":
            _no_grad(plan.readout, x)
        else:
            decompose(lm, x, heads=heads, blocks=blocks)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(mode, model, batch, heads, blocks, seed, q))
    # glibc serves allocations >= 64 KiB with mmap and unmaps them on free, so the resident set
    # tracks live tensors instead of the heap's high-water mark
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        p.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    out = q.get(timeout=3600)
    p.join()
    return out


def _timed(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def overhead(model: str = "timm:vit_base_patch16_224", batch: int = 32, reps: int = 5, device: Optional[str] = None,
             dtype: str = "fp32", heads: bool = True, blocks: Optional[list[int]] = None, threads: Optional[int] = None,
             seed: int = 0) -> dict:
    """Time a plain forward and a decomposition, interleaved, ``reps`` times each; return the figures."""

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = load_model(model, pretrained=False, device=dev, seed=seed)
    x = torch.randn(batch, 3, *lm.image_size, device=dev)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def run(fn):
        def call():
            if amp is None:
                return fn()
            with torch.autocast(dev.type, dtype=amp):
                return fn()
        return call

    plan = plan_for(lm.vision)
    plain = run(lambda: _no_grad(plan.readout, x))
    decomp = run(lambda: decompose(lm, x, heads=heads, blocks=blocks))
    plain(), decomp()                                   # warm-up (allocator, kernels, hooks)
    t_plain, t_dec = [], []
    for _ in range(reps):
        t_plain.append(_timed(plain, dev))
        t_dec.append(_timed(decomp, dev))
    d = decomp()
    mem_plain = peak_memory("plain", model, batch, heads, blocks, seed, dev) if dtype == "fp32" else float("nan")
    mem_dec = peak_memory("decompose", model, batch, heads, blocks, seed, dev) if dtype == "fp32" else float("nan")
    mp, md = statistics.median(t_plain), statistics.median(t_dec)
    return {
        "model": model, "device": str(dev), "dtype": dtype, "batch": batch, "reps": reps,
        "components": len(d.names), "d": d.readout.shape[-1], "residual": float(d.residual().max()),
        "plain_s": mp, "decompose_s": md, "ratio": md / mp,
        "ratio_per_rep": [b / a for a, b in zip(t_plain, t_dec)],
        "plain_peak_mib": mem_plain / 2**20, "decompose_peak_mib": mem_dec / 2**20,
        "contributions_mib": d.contributions.numel() * d.contributions.element_size() / 2**20,
    }


def _no_grad(fn, x):
    with torch.inference_mode():
        return fn(x)


class TreeMemory:
    """Peak summed private resident memory (RSS − shared) of this process and all its descendants
    (the local Ray it started), sampled. Shared pages — Ray's object store, shared libraries — are
    left out: summed RSS would count the object store once per worker that touched it, and exact
    PSS accounting (reading smaps) costs so much CPU that it distorts the job it measures."""

    def __init__(self, interval: float = 0.5):
        import threading

        import psutil

        self.peak, self._interval, self._stop = 0, interval, threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                info = p.memory_info()
                total += info.rss - getattr(info, "shared", 0)
            except Exception:  # noqa: BLE001 -- processes come and go
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def job(model: str = "timm:deit_tiny_patch16_224", images: int = 500, scale: int = 10, fmt: str = "lance",
        batch_size: int = 32, workdir: Optional[str] = None, num_cpus: Optional[int] = None) -> dict:
    """Decompose job vs a readout-only job on the same images; memory at N and scale·N; bytes per image."""
    import tempfile

    import ray
    from PIL import Image

    from .config import DecomposeConfig
    from .pipeline import run_decompose as run

    work = workdir or tempfile.mkdtemp(prefix="vitdecomp-bench-")
    rng = np.random.default_rng(0)

    def corpus(n: int, name: str) -> str:
        root = os.path.join(work, name)
        os.makedirs(root, exist_ok=True)
        for i in range(n):
            p = os.path.join(root, f"{i:06d}.jpg")
            if not os.path.exists(p):
                Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(p, quality=90)
        return root

    small, large = corpus(images, "n"), corpus(images * scale, "n10")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)

    def one(src, out, **kw):
        import shutil

        shutil.rmtree(os.path.join(work, out), ignore_errors=True)       # fresh stores: nothing skipped
        cfg = DecomposeConfig(input=src, output=os.path.join(work, out), model=model, format=fmt,
                              batch_size=batch_size, commit_every=max(256, batch_size), **kw)
        with TreeMemory() as mem:
            s = run(cfg)
        return s, mem.peak

    plain, _ = one(small, "plain", readout_only=True)
    dec, mem_n = one(small, "dec")
    dec10, mem_10n = one(large, "dec10")
    from .store import open_store

    st = open_store(os.path.join(work, "dec"))
    K, d = len(st.names), st.manifest["d"]
    return {"model": model, "images": images, "scale": scale, "format": fmt, "components": K, "d": d,
            "plain_images_per_s": plain.steady_images_per_s, "decompose_images_per_s": dec.steady_images_per_s,
            "throughput_ratio": dec.steady_images_per_s / plain.steady_images_per_s,
            "plain_wall_images_per_s": plain.images_per_s, "decompose_wall_images_per_s": dec.images_per_s,
            "peak_mib_n": mem_n / 2**20, "peak_mib_10n": mem_10n / 2**20, "memory_ratio": mem_10n / mem_n,
            "bytes_per_image": dec.bytes_per_image, "bytes_ratio": dec.bytes_per_image / (K * d * 2),
            "large_images_per_s": dec10.images_per_s}


# ----------------------------------------------------------------------------------- toy world
def _decompose_split(lm, world: str, split: str, batch: int = 256):
    from .toyworld.train import load_images

    x, rows = load_images(world, split, lm.transform)
    parts = [decompose(lm, x[i:i + batch]).contributions.numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts), rows


def _aligned_background_ranking(clf, clip, world: str, cv, names, cache_dir: Optional[str] = None) -> np.ndarray:
    """CompAttribute(world background) − CompAttribute(world color) per classifier component on the
    validation split, through a CompAlign aligner fitted on the training split (toy CLIP teacher)."""
    import torch.nn.functional as F

    from .config import AlignConfig
    from .fit.compalign import fit
    from .query.compattribute import Sums, basis, scores
    from .toyworld.demo import WORLD_PROPERTIES
    from .fit.text import encode_texts
    from .toyworld.train import load_images

    ctr, rows = _decompose_split(clf, world, "train")
    x, _ = load_images(world, "train", clip.transform)
    with torch.inference_mode():
        z = torch.cat([F.normalize(clip.model.encode_image(x[i:i + 256]), dim=-1) for i in range(0, len(x), 256)])
    z = z.numpy()
    val = np.arange(len(ctr)) % 10 == 0

    def batches(split):
        m = val if split == "val" else ~val
        for i in range(0, len(ctr), 256):
            yield ctr[i:i + 256][m[i:i + 256]], z[i:i + 256][m[i:i + 256]]

    aligner, _ = fit(batches, names, ctr.shape[2], z.shape[1], AlignConfig(max_epochs=15, lr=1e-3), progress=False)
    aligned = aligner.apply(cv).astype(np.float64)
    qs = [basis(encode_texts(clip, WORLD_PROPERTIES[p], cache_dir=cache_dir)) for p in ("world background", "world color")]
    sc = scores(Sums.of(aligned, np.concatenate(qs)), [len(q) for q in qs])
    return sc[:, 0] - sc[:, 1]


def spurious_ablation(clf, world: str, ks=(5, 8), clip=None, cache_dir: Optional[str] = None) -> dict:
    """README “The toy world”'s measured protocol: rank the classifier's components by their *signed* push of the
    logit difference towards the class the background predicts, on the (balanced) validation split;
    mean-ablate the top k (validation means); per-group accuracy on the held-out test split.

    With the toy ``clip``, also the published ranking, CompAttribute(background) − CompAttribute(colour)
    through a CompAlign aligner, and how both rankings compare with the components whose ablation
    alone raises validation worst-group accuracy most ("the ones whose ablation does it")."""
    W = clf.model.head.weight.detach().numpy().astype(np.float64)
    b = clf.model.head.bias.detach().numpy().astype(np.float64)
    cv, rv = _decompose_split(clf, world, "val")
    ct, rt = _decompose_split(clf, world, "test")
    names = [c.name for c in components_for(clf)]
    bg_class = lambda r: 0 if r["background"] == "water" else 1                     # noqa: E731 (train: warm↔water)
    sgn = np.array([1.0 if bg_class(r) == 0 else -1.0 for r in rv])
    push = np.einsum("nkd,d->nk", cv, W[0] - W[1]) * sgn[:, None]                   # towards the bg class
    order = np.argsort(-push.mean(0))
    means = cv.mean(0)

    def groups(c, rows):
        pred = (c.sum(1) @ W.T + b).argmax(-1)
        acc = {}
        for p, r in zip(pred, rows):
            acc.setdefault(r["group"], []).append(p == r["label"])
        acc = {g: float(np.mean(v)) for g, v in sorted(acc.items())}
        return {"groups": acc, "worst": min(acc.values()), "mean": float(np.mean(list(acc.values())))}

    def ablated(c, idx):
        c = c.copy()
        c[:, idx] = means[idx]
        return c

    out = {"before": groups(ct, rt)}
    rankings = {"top": order}
    if clip is not None:
        ca = _aligned_background_ranking(clf, clip, world, cv, names, cache_dir)
        ca[names.index("bias")] = -np.inf
        rankings["compattribute"] = np.argsort(-ca)
        # "whose ablation does it": each component mean-ablated alone on validation, worst-group gain
        base = groups(cv, rv)["worst"]
        gain = np.array([groups(ablated(cv, [i]), rv)["worst"] - base if n != "bias" else -np.inf
                         for i, n in enumerate(names)])
        keep = np.isfinite(gain) & np.isfinite(ca)

        def ranks(v):
            return np.argsort(np.argsort(v))
        rho = float(np.corrcoef(ranks(ca[keep]), ranks(gain[keep]))[0, 1])
        out["ranking"] = {"spearman_compattribute_vs_gain": rho,
                          "spearman_signed_vs_gain": float(np.corrcoef(ranks(push.mean(0)[keep]),
                                                                      ranks(gain[keep]))[0, 1]),
                          "gain_top": [names[i] for i in np.argsort(-gain)[:max(ks)]]}
        gain_order = np.argsort(-gain)
        for k in ks:
            top_gain = set(gain_order[:k])
            out["ranking"][f"overlap{k}_compattribute"] = len(top_gain & set(rankings["compattribute"][:k])) / k
            out["ranking"][f"overlap{k}_signed"] = len(top_gain & set(order[:k])) / k
    for k in ks:
        for key, rk in rankings.items():
            out[f"{key}{k}"] = {**groups(ablated(ct, rk[:k]), rt), "ablated": [names[i] for i in rk[:k]]}
        rnd = np.random.default_rng(k).choice(len(names) - 2, k, replace=False) + 1      # random, not embed/bias
        out[f"random{k}"] = groups(ablated(ct, rnd), rt)
    return out


def toyworld(seeds: int = 3, ks=(5, 8), workdir: str = ".vitdecomp-demo") -> dict:
    """Planted-truth figures of the toy world (a finding to report, not a target to tune towards)."""
    from .fit.textspan import Moments, textspan_one
    from .fit.text import encode_texts
    from .toyworld.generate import COLOR_NAMES, SCENES, SHAPES, TEXTURES, WorldConfig, generate, vocabulary_pool
    from .toyworld.registry import TOY_CLIP, TOY_VIT
    from .toyworld.train import TrainConfig, ensure_models, zero_shot_accuracy

    wcfg = WorldConfig()
    world = os.path.join(os.path.abspath(workdir), f"world-{wcfg.key()}")
    generate(world, wcfg)
    cache = os.path.join(os.path.abspath(workdir), "cache")
    runs = []
    clip = None
    for s in range(seeds):
        models = ensure_models(world, wcfg.key(), cache, TrainConfig(seed=s),
                               only=("classifier", "clip") if s == 0 else ("classifier",))
        if s == 0:
            clip = load_model(TOY_CLIP, checkpoint=models["clip"]["checkpoint"])
        clf = load_model(TOY_VIT, checkpoint=models["classifier"]["checkpoint"])
        runs.append(spurious_ablation(clf, world, ks, clip=clip, cache_dir=os.path.join(cache, "text")))
    zs = zero_shot_accuracy(clip, world, "test")
    # TextSpan on the tiny CLIP's heads (test split), first text per head and its attribute
    pool = vocabulary_pool()
    texts = encode_texts(clip, pool, cache_dir=os.path.join(cache, "text"))
    contrib, _ = _decompose_split(clip, world, "test")
    comps = components_for(clip)
    colors = {n for _, n in COLOR_NAMES}
    scenes = {s for f in SCENES.values() for s in f} | set(SCENES)

    def attribute(text: str) -> str:
        words = set(text.replace(",", "").split())
        for name, vocab in (("color", colors | {"warm", "cool"}), ("texture", set(TEXTURES)), ("scene", scenes),
                            ("shape", set(SHAPES)), ("size", {"small", "large"})):
            if words & vocab:
                return name
        return "other"

    spans = {}
    for k, c in enumerate(comps):
        if c.kind != "head":
            continue
        mo = Moments.of(contrib[:, k:k + 1])
        res = textspan_one(mo.n, mo.mean[0], mo.xtx[0], texts, m=3, rank=32)
        spans[c.name] = [(pool[i], attribute(pool[i])) for i in res.picks]
    return {"zero_shot": zs, "runs": runs, "textspan": spans, "ks": list(ks)}
