"""Benchmarks that measure ratios in one run (`vitdecomp benchmark <name>` prints them).

``overhead``: plain forward vs. per-head decomposition of the same model on the same batch, in one
process, interleaved repetitions; median times (wall clock and the process's CPU time), their ratios
and peak memory of each mode. ``overhead_families``: the same for every supported family's stand-in.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch

from .engine import components_for, decompose, plan_for
from .models import load_model

log = logging.getLogger(__name__)


def _peak_child(mode: str, model: str, batch: int, heads: bool, blocks, seed: int, q, model_kwargs=None) -> None:
    """In a fresh process: build the model and batch, run ``mode`` once, report peak RSS growth."""
    lm = load_model(model, pretrained=False, seed=seed, **(model_kwargs or {}))
    x = torch.randn(batch, 3, *lm.image_size)
    plan = plan_for(lm.vision)
    with PeakRSS(0.001) as mem:
        if mode == "plain":
            _no_grad(plan.readout, x)
        else:
            decompose(lm, x, heads=heads, blocks=blocks)
    q.put(mem.growth)


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` seconds;
    ``growth`` = peak − the RSS on entry."""

    def __init__(self, interval: float = 0.002):
        import threading

        import psutil

        self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.base = self.peak = 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    @property
    def growth(self) -> int:
        return self.peak - self.base

    def __enter__(self):
        self.base = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return False


def peak_memory(mode: str, model: str, batch: int, heads: bool = True, blocks=None, seed: int = 0,
                device: Optional[torch.device] = None, model_kwargs: Optional[dict] = None) -> int:
    """Peak memory growth (bytes) of one call of ``mode`` ("plain" or "decompose") of ``model`` built
    with ``model_kwargs``.

    CUDA: ``torch.cuda.max_memory_allocated`` around the call. CPU: the call runs once in a fresh
    process (with glibc's mmap threshold at 64 KiB) and the growth of its resident set, sampled
    every millisecond, is reported; in one process the allocator's cached heap would hide peaks.
    """
    if device is not None and device.type == "cuda":
    
        lm = load_model(model, pretrained=False, device=device, seed=seed, **(model_kwargs or {}))
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
    p = ctx.Process(target=_peak_child, args=(mode, model, batch, heads, blocks, seed, q, model_kwargs))
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
             seed: int = 0, model_kwargs: Optional[dict] = None) -> dict:
    """Time a plain forward and a decomposition, interleaved, ``reps`` times each; return the figures
    (``model`` built with ``model_kwargs``, random init)."""

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = load_model(model, pretrained=False, device=dev, seed=seed, **(model_kwargs or {}))
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
    t_plain, t_dec, c_plain, c_dec = [], [], [], []
    for _ in range(reps):
        c0 = time.process_time()
        t_plain.append(_timed(plain, dev))
        c1 = time.process_time()
        t_dec.append(_timed(decomp, dev))
        c_plain.append(c1 - c0)
        c_dec.append(time.process_time() - c1)
    d = decomp()
    mem_plain = peak_memory("plain", model, batch, heads, blocks, seed, dev, model_kwargs) if dtype == "fp32" \
        else float("nan")
    mem_dec = peak_memory("decompose", model, batch, heads, blocks, seed, dev, model_kwargs) if dtype == "fp32" \
        else float("nan")
    mp, md = statistics.median(t_plain), statistics.median(t_dec)
    return {
        "model": model, "model_kwargs": dict(model_kwargs or {}), "device": str(dev), "dtype": dtype, "batch": batch,
        "reps": reps,
        "components": len(d.names), "d": d.readout.shape[-1], "residual": float(d.residual().max()),
        "plain_s": mp, "decompose_s": md, "ratio": md / mp,
        "ratio_per_rep": [b / a for a, b in zip(t_plain, t_dec)],
        # CPU time of this process (all its threads): on a shared machine the wall-clock ratio also
        # measures the other processes' load; the CPU-time ratio is the work ratio (CPU device only)
        "plain_cpu_s": statistics.median(c_plain), "decompose_cpu_s": statistics.median(c_dec),
        "cpu_ratio": statistics.median(c_dec) / statistics.median(c_plain) if dev.type == "cpu" else float("nan"),
        "plain_peak_mib": mem_plain / 2**20, "decompose_peak_mib": mem_dec / 2**20,
        "contributions_mib": d.contributions.numel() * d.contributions.element_size() / 2**20,
    }


# small-build ``model_kwargs`` of :func:`vitdecomp.models.supported_families` that only shrink the stand-in
# (dropped for ``size="full"``); the others (``use_post_norm``, ``fc_norm`` …) select the family's structure
SIZE_KWARGS = frozenset({"depth", "depths", "embed_dim", "num_heads", "img_size", "window_size", "stem_width",
                         "head_hidden_size", "transformer_dim_head", "depth_token_only", "cls_attn_layers",
                         "neck_chans", "global_attn_indexes", "dims", "layers", "embed_dims"})


def family_builds(families="all", size: str = "full") -> list[tuple[str, str, dict]]:
    """``[(family, stand-in model, model_kwargs)]`` for the labels of :func:`vitdecomp.models.supported_families`
    (``"all"`` or a list): ``size="small"`` keeps the stand-in's small-build kwargs (the tests' sizes),
    ``"full"`` drops those in :data:`SIZE_KWARGS` (the stand-in's own default sizes)."""
    from .errors import InputError
    from .models import supported_families

    fams = supported_families()
    names = list(fams) if families == "all" or list(families) == ["all"] else list(families)
    unknown = [f for f in names if f not in fams]
    if unknown:
        raise InputError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown} for the overhead benchmark; "
                         f"choose among {sorted(fams)} or 'all' (vitdecomp.models.supported_families())")
    if size not in ("small", "full"):
        raise InputError(f"size must be 'small' or 'full', got {size!r}")
    out = []
    for f in names:
        model, kw = fams[f]
        out.append((f, model, kw if size == "small" else {k: v for k, v in kw.items() if k not in SIZE_KWARGS}))
    return out


def overhead_families(families="all", size: str = "full", batch: int = 4, reps: int = 3, device: Optional[str] = None,
                      heads: bool = True, threads: Optional[int] = None, seed: int = 0,
                      progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """:func:`overhead` for each family's stand-in (:func:`family_builds`), in one run: per family the
    time ratio decompose/forward and the peak-memory ratio (``mem_ratio``). A family whose build or
    decomposition fails gets ``{"family", "model", "error"}`` and the run goes on."""
    rows = []
    for fam, model, kw in family_builds(families, size):
        try:
            r = overhead(model, batch, reps, device, "fp32", heads, threads=threads, seed=seed, model_kwargs=kw)
            r["family"] = fam
            r["mem_ratio"] = r["decompose_peak_mib"] / r["plain_peak_mib"] if r["plain_peak_mib"] > 0 else float("nan")
        except Exception as e:  # noqa: BLE001 -- one family's failure is reported in its row
            log.warning("overhead %s (%s): %s", fam, model, e)
            r = {"family": fam, "model": model, "model_kwargs": kw, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(r)
        if progress:
            progress(r)
    return rows


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
            "bytes_per_image": dec.bytes_per_image, "bytes_ratio": dec.bytes_per_image / _payload(st),
            "layout": st.layout,
            "large_images_per_s": dec10.images_per_s}


def _payload(st) -> int:
    """fp16 bytes of one row's component columns as the store's layout keeps them (``K·d·2`` when full)."""
    import pyarrow as pa

    return sum(f.type.list_size * 2 for f in st.schema() if (f.name.startswith("c_") or f.name == "chain_offset")
               and pa.types.is_fixed_size_list(f.type))


# ----------------------------------------------------------------------------------- toy world
def _decompose_split(lm, world: str, split: str, batch: int = 256):
    from .toyworld.train import load_images

    x, rows = load_images(world, split, lm.transform)
    parts = [decompose(lm, x[i:i + batch]).contributions.numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts), rows


def _world_scores(contrib: np.ndarray, clip, cache_dir: Optional[str] = None) -> dict:
    """Per CompAttribute score option: ``mitigation`` = CompAttribute(world background) −
    CompAttribute(world color) scored over those two properties (what ``query mitigate`` computes) and
    ``all`` = ``[K, P]`` over every world property (``properties``: their names, in order)."""
    from .fit.text import encode_texts
    from .query.compattribute import SCORES, Sums, basis, scores
    from .toyworld.demo import WORLD_PROPERTIES

    props = list(WORLD_PROPERTIES)
    qs = [basis(encode_texts(clip, WORLD_PROPERTIES[p], cache_dir=cache_dir)) for p in props]
    sizes = [len(q) for q in qs]
    sums = Sums.of(np.asarray(contrib, np.float64), np.concatenate(qs))
    bg, col = props.index("world background"), props.index("world color")
    a = np.cumsum([0] + sizes)
    pick = np.r_[a[bg]:a[bg + 1], a[col]:a[col + 1]]
    two = Sums(sums.n, sums.s[pick], sums.s2[pick], sums.p[:, pick], sums.p2[:, pick], sums.sp[:, pick])
    out = {"properties": props}
    for score in SCORES:
        sc2 = scores(two, [sizes[bg], sizes[col]], score)
        out[score] = {"mitigation": sc2[:, 0] - sc2[:, 1], "all": scores(sums, sizes, score)}
    return out


def _aligned_background_ranking(clf, clip, world: str, cv, names, cache_dir: Optional[str] = None,
                                align_epochs: int = 15) -> dict:
    """:func:`_world_scores` of the classifier's validation contributions through a CompAlign aligner
    fitted on the training split (toy CLIP teacher)."""
    import torch.nn.functional as F

    from .config import AlignConfig
    from .fit.compalign import fit
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

    aligner, _ = fit(batches, names, ctr.shape[2], z.shape[1], AlignConfig(max_epochs=align_epochs, lr=1e-3),
                     progress=False)
    return _world_scores(aligner.apply(cv), clip, cache_dir)


def _distinct_tops(sc: np.ndarray, names, skip=("bias",)) -> dict:
    """The top component per property (``sc [K, P]``; ``bias`` excluded) and how many distinct ones."""
    keep = np.array([n not in skip for n in names])
    tops = [names[int(np.argmax(np.where(keep, sc[:, j], -np.inf)))] for j in range(sc.shape[1])]
    return {"tops": tops, "distinct": len(set(tops)), "properties": sc.shape[1]}


def spurious_ablation(clf, world: str, ks=(5, 8), clip=None, cache_dir: Optional[str] = None,
                      align_epochs: int = 15) -> dict:
    """README “The toy world”'s measured protocol: rank the classifier's components by their *signed* push of the
    logit difference towards the class the background predicts, on the (balanced) validation split;
    mean-ablate the top k (validation means); per-group accuracy on the held-out test split.

    With the toy ``clip``, also the published ranking, CompAttribute(background) − CompAttribute(colour)
    through a CompAlign aligner, and how both rankings compare with the components whose ablation
    alone raises validation worst-group accuracy most ("the ones whose ablation does it"); the same for
    every CompAttribute score option under ``out["scores"][option]`` (``compattribute{k}`` and the
    ``ranking`` entries are the published ``correlation`` score's)."""
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
        ws = _aligned_background_ranking(clf, clip, world, cv, names, cache_dir, align_epochs)
        cas = {}
        for score in (k for k in ws if k != "properties"):
            ca = ws[score]["mitigation"].copy()
            ca[names.index("bias")] = -np.inf
            cas[score] = ca
        ca = cas["correlation"]
        rankings["compattribute"] = np.argsort(-ca)
        # "whose ablation does it": each component mean-ablated alone on validation, worst-group gain
        base = groups(cv, rv)["worst"]
        gain = np.array([groups(ablated(cv, [i]), rv)["worst"] - base if n != "bias" else -np.inf
                         for i, n in enumerate(names)])
        keep = np.isfinite(gain) & np.isfinite(ca)

        def ranks(v):
            return np.argsort(np.argsort(v))
        rho = float(np.corrcoef(ranks(ca[keep]), ranks(gain[keep]))[0, 1])
        out["scores"] = {}
        for score, c in cas.items():
            rk = np.argsort(-c)
            out["scores"][score] = {
                "spearman_vs_gain": float(np.corrcoef(ranks(c[keep]), ranks(gain[keep]))[0, 1]),
                "top_per_property": dict(zip(ws["properties"], _distinct_tops(ws[score]["all"], names)["tops"])),
                "distinct_tops": _distinct_tops(ws[score]["all"], names)["distinct"],
                **{f"overlap{k}": len(set(np.argsort(-gain)[:k]) & set(rk[:k])) / k for k in ks},
                **{f"top{k}": {**groups(ablated(ct, rk[:k]), rt), "ablated": [names[i] for i in rk[:k]]}
                   for k in ks}}
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


def toyworld(seeds: int = 3, ks=(5, 8), workdir: str = ".vitdecomp-demo", align_epochs: int = 15) -> dict:
    """Planted-truth figures of the toy world (a finding to report, not a target to tune towards).
    Seed 0 uses the shipped models when they fit the default world; the other seeds train a classifier."""
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
                               only=("classifier", "clip") if s == 0 else ("classifier",), world_cfg=wcfg)
        if s == 0:
            clip = load_model(TOY_CLIP, checkpoint=models["clip"]["checkpoint"])
        clf = load_model(TOY_VIT, checkpoint=models["classifier"]["checkpoint"])
        runs.append(spurious_ablation(clf, world, ks, clip=clip, cache_dir=os.path.join(cache, "text"),
                                      align_epochs=align_epochs))
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
    # every score option on the tiny CLIP's own decomposition (no aligner): the top component per world
    # property, and the head that carries the background most (TextSpan's first text for it)
    names = [c.name for c in comps]
    own = _world_scores(contrib, clip, os.path.join(cache, "text"))
    bg = own["properties"].index("world background")
    heads = [k for k, c in enumerate(comps) if c.kind == "head"]
    clip_scores = {}
    for score in (k for k in own if k != "properties"):
        top_head = names[max(heads, key=lambda k: own[score]["all"][k, bg])]
        clip_scores[score] = {**_distinct_tops(own[score]["all"], names), "background_head": top_head,
                              "background_head_first_text": spans[top_head][0][0]}
    return {"zero_shot": zs, "runs": runs, "textspan": spans, "ks": list(ks), "align_epochs": align_epochs,
            "clip_scores": clip_scores, "properties": own["properties"]}


# ------------------------------------------------------------------------------ resume planning
def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _resume_child(mode: str, uri: str, listing: int, block: int, q) -> None:
    """In a fresh process: build the listing (``listing`` ids, as a folder source would hold), then plan
    the resume against the store at ``uri`` with ``mode`` ("old": the driver-side id set of
    ``Store.done_ids``; "new": :func:`vitdecomp.pipeline.resume.not_stored`; "empty": nothing stored)
    and report seconds, peak RSS growth over the listing, the inputs left to do, and the time of one
    read task's in-task anti-join (``StoredIds.present`` on ``block`` ids)."""
    from .pipeline.resume import StoredIds, not_stored
    from .store import open_store

    ids = _bench_ids(listing)
    st = open_store(uri)              # opening the store and the scan machinery is common to every mode
    st.read(columns=["image_id"], ids=[ids[0]])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if mode == "old":
            skip = open_store(uri).done_ids()
            todo = sum(1 for i in ids if i not in skip)
        elif mode == "new":
            stored = StoredIds.of(open_store(uri))
            todo = int(not_stored(ids, stored).sum())
        else:
            todo = len(ids)
        seconds = time.perf_counter() - t0
    task_s = None
    if mode == "new":
        stored = StoredIds.of(open_store(uri))
        t1 = time.perf_counter()
        stored.present(ids[-block:])
        task_s = time.perf_counter() - t1
    q.put({"mode": mode, "seconds": seconds, "added_mib": mem.growth / 2**20, "todo": todo, "task_s": task_s})


def _bench_ids(n: int) -> list[str]:
    """``n`` image ids shaped like a folder's relative paths (100 class folders)."""
    return [f"class{i % 100:03d}/img{i:08d}.jpg" for i in range(n)]


def build_id_store(uri: str, rows: int, fmt: str = "lance", error_share: float = 0.01, chunk: int = 65_536) -> str:
    """A store holding ``rows`` ids (the first ``rows`` of :func:`_bench_ids`; every 1/``error_share``-th
    as an error row) with a minimal schema (``image_id``, ``uri``), written through the Store API in
    commits of ``chunk`` ids — no model runs. Reused when it exists with that many ids."""
    import pyarrow as pa

    from .config import DecomposeOptions
    from .engine import components_for
    from .store import Manifest, Store
    from .store.schema import ERRORS_SCHEMA

    st = Store(uri)
    if st.exists() and st.count() + st.read(columns=["image_id"], table="errors").num_rows == rows:
        return uri
    lm = load_model("timm:deit_tiny_patch16_224", load_weights=False)
    m = Manifest.build(lm, components_for(lm, blocks=[11], heads=False), DecomposeOptions(), format=fmt,
                       source_kind="benchmark", readout_only=True)
    st = Store.create(uri, m, schema=pa.schema([pa.field("image_id", pa.string()), pa.field("uri", pa.string())]))
    every = max(1, int(round(1 / error_share))) if error_share else 0
    ids = _bench_ids(rows)
    now = int(time.time() * 1000)
    for s in range(0, rows, chunk):
        part = ids[s:s + chunk]
        err = [i for k, i in enumerate(part, s) if every and k % every == 0]
        good = [i for k, i in enumerate(part, s) if not (every and k % every == 0)]
        errors = pa.table({"image_id": err, "uri": err, "stage": ["decode"] * len(err), "reason": ["bench"] * len(err),
                           "time": pa.array([now] * len(err), pa.timestamp("ms", tz="UTC"))}, schema=ERRORS_SCHEMA)
        st.commit(st.write_uncommitted(pa.table({"image_id": good, "uri": good}, schema=st.schema())), errors)
    return uri


def resume(rows: int = 1_000_000, new: float = 0.1, fmt: str = "lance", workdir: Optional[str] = None,
           block: int = 65_536) -> dict:
    """Resume planning against a store holding ``rows`` ids, for a listing of ``rows·(1+new)`` inputs:
    the old driver-side id set (``Store.done_ids``) vs the streamed anti-join, each in a fresh
    process: seconds and peak RSS growth over holding the listing (targets at 1 M ids: ≤ 30 s,
    ≤ 100 MB); plus the in-task anti-join of one read task's block of ``block`` ids."""
    import multiprocessing as mp
    import tempfile

    work = workdir or tempfile.mkdtemp(prefix="vitdecomp-resume-")
    t0 = time.perf_counter()
    uri = build_id_store(os.path.join(work, f"ids-{rows}-{fmt}"), rows, fmt)
    build_s = time.perf_counter() - t0
    listing = int(rows * (1 + new))
    out = {"rows": rows, "listing": listing, "format": fmt, "build_s": build_s, "block": block}
    ctx = mp.get_context("spawn")
    import queue

    for mode in ("empty", "old", "new"):
        q = ctx.Queue()
        p = ctx.Process(target=_resume_child, args=(mode, uri, listing, block, q))
        p.start()
        while True:
            try:
                out[mode] = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"the {mode!r} measurement process died (exit code {p.exitcode}; "
                                       "killed for memory?) — rerun with fewer --rows") from None
        p.join()
    return out


# ------------------------------------------------------------------------------------ explorer
def explorer(rows: int = 1_000_000, workdir: Optional[str] = None, layout: str = "compact", d: int = 128,
             blocks: int = 2, heads: int = 4, head_dim: int = 16, queries: int = 5, exact: bool = True) -> dict:
    """The explorer (``vitdecomp serve``) on a synthetic store of ``rows`` images
    (:func:`vitdecomp.store.synthetic.write_synthetic_store`; reused when present): seconds from
    opening the store to the first page served over HTTP, to build the Lance vector index of one
    head, and per nearest-neighbour query through the index (the per-head neighbours page of a store
    image, rendered), against one exact scan of the same query. Targets at 1 M rows: first page
    ≤ 3 s, a query ≤ 1 s once the index exists."""
    import tempfile
    import urllib.request

    from .config import ServeConfig
    from .serve import build
    from .serve.app import start_server
    from .store import Store
    from .store.synthetic import write_synthetic_store

    work = workdir or tempfile.mkdtemp(prefix="vitdecomp-explorer-")
    uri = os.path.join(work, f"synthetic-{rows}-{layout}-d{d}")
    t0 = time.perf_counter()
    st = Store(uri)
    if not (st.exists() and st.count() == rows):
        if st.exists():
            raise ValueError(f"{uri} holds another store; remove it or pick another workdir")
        write_synthetic_store(uri, rows, layout=layout, d=d, blocks=blocks, heads=heads, head_dim=head_dim)
    write_s = time.perf_counter() - t0
    cache = os.path.join(work, "explorer-cache")
    comp = f"blocks.{blocks - 1}.attn.head.1"

    def get(url: str, hits: int = 0) -> tuple[float, int]:
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=600) as r:
            body = r.read()
        took = time.perf_counter() - t
        if body.count(b'class="hit"') < hits:
            raise RuntimeError(f"{url} answered without its {hits} results")
        return took, len(body)

    cold_s = _cold_start(uri, cache)

    t0 = time.perf_counter()
    ex, app = build(ServeConfig(store=uri, index_cache=cache, port=0, index_threshold=1))     # always the index
    srv, url = start_server(app)
    try:
        _, size = get(url + "/")
        first_page_s = time.perf_counter() - t0
        heads_page_s, _ = get(f"{url}/heads?component={comp}")
        t1 = time.perf_counter()
        import glob

        had_index = bool(glob.glob(os.path.join(cache, ex.version, "index-*.lance.done")))
        ex.index([comp])
        index_s = time.perf_counter() - t1
        rng = np.random.default_rng(0)
        probes = [f"img-{i:07d}" for i in rng.integers(0, rows, queries)]
        times = [get(f"{url}/heads?component={comp}&image_id={p}&k=16", hits=16)[0] for p in probes]
        exact_s = None
        if exact:
            from .query.retrieval import exact_search

            t2 = time.perf_counter()
            probe = ex.vector_of(probes[0], [comp])
            exact_search(ex.st, [comp], probe, 16, (probes[0],))
            exact_s = time.perf_counter() - t2
    finally:
        srv.shutdown()
    return {"rows": rows, "layout": layout, "d": d, "components": len(ex.names), "store": uri, "write_s": write_s,
            "cold_start_s": cold_s,
            "first_page_s": first_page_s, "first_page_bytes": size, "heads_page_s": heads_page_s,
            "index_s": index_s, "index_cached": had_index, "query_s": times, "query_median_s": float(np.median(times)),
            "query_max_s": float(np.max(times)), "exact_s": exact_s, "component": comp}


def _cold_start(store: str, cache: str, timeout: float = 300.0) -> float:
    """Seconds from launching ``vitdecomp serve`` in a fresh process (imports included) to its first page."""
    import subprocess
    import sys
    import urllib.request

    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "vitdecomp.cli", "serve", "--store", store, "--port", "0",
                          "--index-cache", cache, "-q"], stdout=subprocess.PIPE, text=True)
    try:
        import re

        line = p.stdout.readline()
        m = re.search(r"(http://\S+?)/? ", line)
        if not m:
            raise RuntimeError(f"vitdecomp serve printed {line!r}")
        with urllib.request.urlopen(m.group(1) + "/", timeout=timeout) as r:
            r.read()
        return time.perf_counter() - t0
    finally:
        p.terminate()
        p.wait(30)


# ------------------------------------------------------------------ store layouts at scale (README “Store layout”)
SCALE_SHAPE = {"d": 128, "blocks": 4, "heads": 4, "head_dim": 32}
VITB_SHAPE = {"d": 768, "blocks": 12, "heads": 12, "head_dim": 64}


def _scale_child(uri: str, passes: tuple, q) -> None:
    """One store's passes in a fresh process: seconds per pass and the process's peak RSS."""
    from .fit.probe import LinearHead
    from .fit.textspan import moments_from_store
    from .query.ablation import ablation_masks, component_means, evaluate_ablations
    from .query.compattribute import compattribute
    from .store import open_store
    from .store.synthetic import planted_directions

    st = open_store(uri)
    names = st.names
    out = {}
    timed = {}

    def best(key, fn, reps: int = 2) -> None:          # the faster of two runs (the machine is shared)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        timed[key] = min(ts)

    heads = [c.name for c in st.components if c.kind == "head"]
    dirs = planted_directions(st)

    def scan(columns=None):     # the baseline: a raw Lance scan of the columns (the passes' reader bounds), no decoding
        from .store.stream import LANCE_SCAN

        cols = columns or ["readout", "label", "group", *st.columns_for(names)]
        for _ in st._lance("contributions").to_batches(columns=cols, batch_size=8192, **LANCE_SCAN):
            pass

    head = LinearHead("probe", ["neg", "pos"], np.stack([-dirs[0], dirs[0]]), np.zeros(2))
    masks = {i: m["mask"] for i, m in enumerate(ablation_masks(st.components, names))}

    def ablate():
        means = component_means(st, names, head, None)
        evaluate_ablations(st, names, head, masks, means, None, "label")

    # each pass's own columns; query ablate reads the store twice (the means, then the masked predictions)
    comp_cols = st.columns_for(names)
    scans = {"textspan": [st.columns_for(heads)], "compattribute": [comp_cols],
             "ablate": [comp_cols, [*comp_cols, "label"]]}
    fns = {"scan": scan, "textspan": lambda: moments_from_store(st, heads, distributed=False, batch_size=8192),
           "compattribute": lambda: compattribute(st, None, {"planted": dirs}, distributed=False, batch_size=8192),
           "ablate": ablate}
    scan()                      # warm the file cache once, so every pass reads the same way
    for key in passes:
        if key in scans:
            best(f"scan_{key}", lambda: [scan(c) for c in scans[key]])
        best(key, fns[key])
    out.update(timed)
    out["load"] = os.getloadavg()[0]
    out["peak_rss_mib"] = _own_peak_rss_mib()
    q.put(out)


def _own_peak_rss_mib() -> float:
    """This process's own peak RSS: ``VmHWM`` (reset at exec) where /proc has it; ``ru_maxrss`` elsewhere,
    which a spawned child inherits from its parent at fork (a parent that wrote a big store would
    otherwise show as every child's peak)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(fn, *args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def scale(rows=(10_000, 100_000), workdir: Optional[str] = None, shape: Optional[dict] = None,
          passes=("scan", "textspan", "compattribute", "ablate")) -> dict:
    """Synthetic stores of each size in both layouts (reused when present): per pass seconds ÷ a raw Lance
    scan of the same columns, peak RSS, bytes per image and the compact-vs-full speedup."""
    import tempfile

    from .store import open_store
    from .store.synthetic import write_synthetic_store

    shape = dict(shape or SCALE_SHAPE)
    workdir = workdir or tempfile.mkdtemp(prefix="vitdecomp-scale-")
    out = {"shape": shape, "workdir": workdir, "sizes": []}
    for n in rows:
        entry = {"rows": n}
        for layout in ("full", "compact"):
            uri = os.path.join(workdir, f"{layout}-{n}-" + "-".join(str(v) for v in shape.values()))
            t0 = time.perf_counter()
            try:
                st = open_store(uri)
                if st.count() != n:
                    raise ValueError("incomplete")
            except Exception:       # noqa: BLE001 -- (re)write a missing or partial store
                import shutil

                shutil.rmtree(uri, ignore_errors=True)
                st = write_synthetic_store(uri, n, layout=layout, **shape)
            res = _in_child(_scale_child, uri, tuple(passes))
            res["write_s"] = time.perf_counter() - t0
            res["bytes_per_image"] = st.nbytes() / n
            entry[layout] = res
        out["sizes"].append(entry)
    return out


def layout_bytes(model: str, blocks=None, images: int = 4, seed: int = 0) -> dict:
    """Bytes per image of the compact and full fp16 layouts for ``model`` (random init), and each layout's
    per-component max relative error against the fp32 in-process decomposition."""
    import tempfile

    from .config import DecomposeOptions
    from .store import Store
    from .store.compact import build_manifest

    torch.manual_seed(seed)
    lm = load_model(model, pretrained=False)
    x = torch.randn(images, 3, *lm.image_size, generator=torch.Generator().manual_seed(seed + 1))
    dec = decompose(lm, x, blocks=blocks)
    ref = dec.contributions.double().numpy()
    out = {"model": model, "blocks": "all" if blocks is None else f"{min(blocks)}-{max(blocks)}",
           "components": len(dec.names), "d": ref.shape[-1]}
    heads = [k for k, c in enumerate(dec.components) if c.kind == "head"]
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("full", "compact"):
            opts = DecomposeOptions(dtype="fp16", blocks=None if blocks is None else f"{min(blocks)}-{max(blocks)}")
            m, basis = build_manifest(lm, dec.components, opts, layout=layout)
            st = Store.create(os.path.join(tmp, layout), m, basis=basis)
            st.append(dec, [f"i{k}" for k in range(images)])
            got = next(st.iter_batches(batch_size=images, dtype=np.float64)).contributions
            den = np.linalg.norm(ref, axis=-1)
            err = np.linalg.norm(got - ref, axis=-1) / np.where(den > 0, den, 1.0)
            widths = m.widths()
            out[layout] = {"bytes_per_image": st.nbytes() / images, "max_rel_error": float(err.max()),
                           "max_rel_error_heads": float(err[:, heads].max()) if heads else 0.0,
                           "head_bytes": sum(widths.get(dec.names[k], ref.shape[-1]) for k in heads) * 2}
    return out


def zoo(timm_filter: str = "", open_clip_filter: str = "", libraries=("timm", "open_clip"), workers: int = 2,
        timeout_s: float = 300.0, max_params: Optional[int] = None, limit: Optional[int] = None,
        out: Optional[str] = None, progress=None) -> dict:
    """The zoo sweep (:mod:`vitdecomp.zoo`): every transformer-family timm architecture and every open_clip
    architecture (``*_filter``: fnmatch patterns; ``limit``: the first N, in name order) built shrunk with
    random weights and classified. Returns the results document (written to ``out`` when given)."""
    import json

    from . import zoo as Z

    archs = Z.architectures(timm_filter, open_clip_filter, tuple(libraries))
    if limit:
        archs = dict(list(archs.items())[:limit])
    # results are appended to OUT.partial.jsonl as they arrive; a rerun with the same OUT resumes
    partial = f"{out}.partial.jsonl" if out else None
    done: dict = {}
    if partial and os.path.exists(partial):
        with open(partial) as f:
            for line in f:
                if line.strip():
                    r = Z.ZooResult(**json.loads(line))
                    done[r.name] = r
    sink = open(partial, "a") if partial else None

    def arrived(r, i, n):
        if sink:
            sink.write(json.dumps(r.to_json()) + "\n")
            sink.flush()
        if progress:
            progress(r, i + len(done), len(archs))

    t0 = time.perf_counter()
    try:
        fresh = Z.sweep({k: v for k, v in archs.items() if k not in done}, workers=workers, timeout_s=timeout_s,
                        max_params=max_params or Z.MAX_PARAMS, progress=arrived)
    finally:
        if sink:
            sink.close()
    by_name = {**done, **{r.name: r for r in fresh}}
    results = [by_name[k] for k in archs]
    doc = Z.to_json(results, meta={"seconds": round(time.perf_counter() - t0, 1), "resumed": len(done), "workers": workers,
                                   "timeout_s": timeout_s, "max_params": max_params or Z.MAX_PARAMS,
                                   "timm_filter": timm_filter, "open_clip_filter": open_clip_filter,
                                   "modules": list(Z.TIMM_TRANSFORMER_MODULES)})
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        os.remove(partial)
    return doc


def zoo_readme(results_json: str, readme: str = "README.md") -> str:
    """Regenerate the README's zoo table (between its markers) from a ``benchmark zoo --out`` file;
    returns the table."""
    import json

    from . import zoo as Z

    with open(results_json) as f:
        table = Z.readme_table(json.load(f))
    with open(readme) as f:
        text = f.read()
    with open(readme, "w") as f:
        f.write(Z.replace_readme_table(text, table))
    return table
