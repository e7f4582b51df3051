"""The zoo sweep: every transformer-family timm architecture and every open_clip architecture, built
small with random weights, either decomposes exactly or is refused with :class:`UnsupportedModuleError`.

For each architecture (one entry per name, without pretrained tags) :func:`check_model` builds a
shrunk random-initialised model (:func:`shrink_candidates`: fewer blocks, narrower widths where the
constructor accepts them, else the default build; open_clip towers on a timm trunk get a small trunk
registered with timm by :func:`register_tiny_timm`), runs :func:`vitdecomp.decompose` on seeded random
images at the model's own input size and classifies the result (:data:`STATUSES`):

* ``exact`` — the readout is the model's own (timm ``forward_head(forward_features(x), pre_logits=True)``,
  open_clip ``encode_image``) and the contributions sum to it (relative error ≤ :data:`TOL`, fp32);
* ``refused`` — :class:`~vitdecomp.errors.UnsupportedModuleError` (its message is kept);
* ``foreign`` — any other exception from vitdecomp (a bug);
* ``wrong`` — a readout that is not the model's own, or a reconstruction error above :data:`TOL` (a bug);
* ``too_large`` — more parameters than the budget even when shrunk (:func:`budget_params`: open_clip
  counts the vision tower only);
* ``build_failed`` — the upstream constructor or the model's own forward fails (not ours);
* ``timeout`` — the model did not finish within the per-model time limit (its worker is killed).

:func:`sweep` runs models in worker processes (one hang cannot stop the sweep); :func:`summarize`
counts per family; :func:`readme_table` renders the README "Supported models (zoo sweep)" table.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import multiprocessing as mp
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from typing import Callable, Iterable, Optional, Sequence

log = logging.getLogger(__name__)

# timm modules (``timm.list_modules()``) whose models are "transformer families": vision transformers
# and hybrids whose blocks contain attention. Every model of these modules is swept.
TIMM_TRANSFORMER_MODULES = (
    "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "vision_transformer_sam",
    "deit", "beit", "cait", "eva", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
    "maxxvit", "xcit", "pit", "twins", "hiera", "hieradet_sam2", "naflexvit", "tiny_vit", "levit",
    "efficientformer", "efficientformer_v2", "fastvit", "coat", "convit", "crossvit", "tnt", "volo", "gcvit",
    "davit", "nextvit", "mvitv2", "nest", "pvt_v2", "vitamin",
)
STATUSES = ("exact", "refused", "foreign", "wrong", "too_large", "build_failed", "timeout")
BUGS = ("foreign", "wrong")          # never allowed
TOL = 1e-5                           # fp32 relative reconstruction error (README "Supported models")
MAX_PARAMS = 60_000_000              # parameter budget of a shrunk build
OPEN_CLIP_FAMILY = "open_clip"


@dataclass
class ZooResult:
    """One architecture's outcome. ``name``: ``timm:<model>`` or ``open_clip:<arch>``; ``family``: its
    timm module (or ``open_clip``); ``kwargs``: the shrink overrides it was built with."""

    name: str
    family: str
    status: str
    message: str = ""
    kwargs: dict = field(default_factory=dict)
    params: int = 0
    residual: Optional[float] = None
    readout_error: Optional[float] = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def timm_architectures(modules: Sequence[str] = TIMM_TRANSFORMER_MODULES, filter: str = "") -> dict[str, str]:
    """``{"timm:<model>": module}`` for every timm model of ``modules`` (optionally an fnmatch ``filter``)."""
    import timm

    out = {}
    for mod in modules:
        for name in timm.list_models(module=mod):
            if not filter or fnmatch.fnmatch(name, filter):
                out[f"timm:{name}"] = mod
    return dict(sorted(out.items()))


def open_clip_architectures(filter: str = "") -> dict[str, str]:
    """``{"open_clip:<arch>": "open_clip"}`` for every ``open_clip.list_models()`` architecture."""
    import open_clip

    return {f"open_clip:{a}": OPEN_CLIP_FAMILY for a in open_clip.list_models()
            if not filter or fnmatch.fnmatch(a, filter)}


def architectures(timm_filter: str = "", open_clip_filter: str = "", libraries=("timm", "open_clip")) -> dict[str, str]:
    """Every swept architecture → family (deterministic order)."""
    out: dict[str, str] = {}
    if "timm" in libraries:
        out.update(timm_architectures(filter=timm_filter))
    if "open_clip" in libraries:
        out.update(open_clip_architectures(open_clip_filter))
    return out


# timm trunk overrides tried for an open_clip tower built on a timm model (``vision_cfg.timm_model_name``),
# first that the constructor accepts wins: ViT-like (depth/width), Swin-like, ConvNeXt-like, generic stages,
# FastViT-like (``layers``), then the default build.
TRUNK_SHRINKS: tuple[dict, ...] = (
    dict(depth=2, embed_dim=128, num_heads=2), dict(depth=2),
    dict(depths=(1, 1, 1, 1), embed_dim=32, num_heads=(2, 2, 2, 2)), dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128)),
    dict(depths=(1, 1, 1, 1)), dict(depths=(1, 1, 1)), dict(layers=(1, 1, 1, 1, 1), embed_dims=(64, 64, 128, 128, 256)),
    dict(layers=(1, 1, 1, 1), embed_dims=(64, 64, 128, 128)), {},
)
TINY_PREFIX = "vitdecomp_tiny_"


def tiny_timm_name(base: str, shrink: dict) -> str:
    """The timm name :func:`register_tiny_timm` registers for ``base`` built with ``shrink``:
    ``vitdecomp_tiny_<digest of shrink>__<base>`` (deterministic, so every process derives the same)."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(shrink, sort_keys=True, default=list).encode()).hexdigest()[:8]
    return f"{TINY_PREFIX}{digest}__{base}"


def register_tiny_timm(base: str, shrink: dict) -> str:
    """Register (once per process) a timm entrypoint that builds the timm model ``base`` with the overrides
    ``shrink`` (the caller's own keyword arguments win, e.g. open_clip's ``num_classes``/``global_pool``),
    and return its name. open_clip builds a tower's trunk by name (``vision_cfg.timm_model_name``), so a
    small trunk of a real open_clip architecture is ``vision_cfg={..., "timm_model_name": <this name>}``;
    nothing of timm or open_clip is patched. Spawned workers register again (see :func:`shrink_candidates`)."""
    import timm
    from timm.models import register_model

    name = tiny_timm_name(base, shrink)
    if not timm.is_model(name):
        def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kw):
            return timm.create_model(base, pretrained=False, **{**shrink, **kw})

        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = __name__
        register_model(entry)
    return name


def _open_clip_shrunk(arch: str) -> list[dict]:
    """open_clip overrides, in order: a small vision tower — a timm trunk (``timm_model_name``) rebuilt
    through :func:`register_tiny_timm` with each of :data:`TRUNK_SHRINKS`; an open_clip ViT with 2 blocks
    (then also 128 wide); a ModifiedResNet with one block per stage (then also 32 wide) — each with a
    1-block, 64-wide text tower (and CoCa multimodal decoder); then the text-tower shrink alone; ``{}`` last.
    Text towers from HuggingFace (``hf_model_name``) are kept: they need ``transformers``."""
    import open_clip

    cfg = open_clip.get_model_config(arch) or {}
    vc0, tc0 = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    common = {}
    if isinstance(tc0.get("layers"), int) and not tc0.get("hf_model_name"):   # the text tower is not decomposed
        common["text_cfg"] = {**copy.deepcopy(tc0), "layers": 1, "width": 64, "heads": 2}
    mc0 = cfg.get("multimodal_cfg")
    if isinstance(mc0, dict) and isinstance(mc0.get("layers"), int):
        common["multimodal_cfg"] = {**copy.deepcopy(mc0), "layers": 1, "width": 64, "heads": 2}
    visions: list[dict] = []
    layers, width = vc0.get("layers"), vc0.get("width")
    if vc0.get("timm_model_name"):
        visions = [{**copy.deepcopy(vc0), "timm_model_name": register_tiny_timm(vc0["timm_model_name"], s)}
                   for s in TRUNK_SHRINKS]
    elif isinstance(layers, int):
        vc = {**copy.deepcopy(vc0), "layers": min(layers, 2)}
        visions = [vc] + ([{**vc, "width": 128, "head_width": 64}] if isinstance(width, int) and width > 128 else [])
    elif isinstance(layers, (list, tuple)):
        vc = {**copy.deepcopy(vc0), "layers": [1] * len(layers)}
        visions = [vc] + ([{**vc, "width": 32}] if isinstance(width, int) and width > 32 else [])
    out: list[dict] = []
    for kw in [{"vision_cfg": v, **common} for v in visions if v != vc0] + [common, {}]:
        if kw not in out:
            out.append(kw)
    return out


def shrink_candidates(name: str) -> list[dict]:
    """``model_kwargs`` to try in order (the first that builds within the budget and runs is used):
    fewer blocks and narrower widths where the constructor takes ``depth``/``depths``/``embed_dim``/
    ``num_heads``, then :data:`TIMM_SHRINKS_NARROW`, then the default build ``{}``."""
    if name.startswith("open_clip:"):
        return _open_clip_shrunk(name.split(":", 1)[1])
    return [dict(depth=2, embed_dim=128, num_heads=2), dict(depth=2), dict(depths=(1, 1, 1, 1)),
            dict(depths=(1, 1, 1)), *TIMM_SHRINKS_NARROW, {}]


# tried after the generic shrinks above (so models they fit keep their build): per-stage ``depth`` tuples
# (LeViT, PiT), one block per stage with a narrow ``embed_dim`` (Swin V2-CR giants: too large at full width)
# or narrow per-stage ``embed_dim`` (CoAtNet/MaxxViT, e.g. ``coatnet_5_224``), per-block grouped K/V heads
# (EVA ``*_sapiens2``: ``num_kv_heads`` needs one entry per block)
TIMM_SHRINKS_NARROW: tuple[dict, ...] = (
    dict(depth=(1, 1, 1)), dict(depths=(1, 1, 1, 1), embed_dim=32),
    dict(depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64)),
    dict(depth=2, embed_dim=128, num_heads=4, num_kv_heads=(2, 2)),
)


def budget_params(model) -> int:
    """The parameters counted against the budget: the decomposed model — for open_clip its vision tower
    (``model.visual``; the text tower is not decomposed), for timm the whole model."""
    return sum(p.numel() for p in getattr(model, "visual", model).parameters())


def meta_params(name: str, kw: dict):
    """Budget parameter count (:func:`budget_params`) of ``name`` built with ``kw`` on the meta device (no memory, no init cost); the
    error message when the constructor rejects ``kw`` (``TypeError``/``ValueError``/``AssertionError``);
    ``None`` when a meta build is not possible for another reason (a real build decides)."""
    import torch

    lib, arch = name.split(":", 1)
    try:
        with torch.device("meta"):
            if lib == "timm":
                import timm

                m = timm.create_model(arch, pretrained=False, **kw)
            else:
                import open_clip

                m = open_clip.create_model(arch, pretrained=None, device="meta", **kw)
        return budget_params(m)
    except (TypeError, ValueError, AssertionError) as e:
        return _message(e, 300)
    except Exception:  # noqa: BLE001 -- meta tensors unsupported by some init: let the real build decide
        return None


def _timm_upstream(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _readout_candidates(model, readout):
    """The model's own readout from vitdecomp's ``z``: ``z`` itself, or for heads whose ``pre_logits``
    ends in a non-linearity (MaxViT: tanh) that non-linearity applied to ``z``."""
    act = getattr(getattr(getattr(model, "head", None), "pre_logits", None), "act", None)
    return [readout] + ([act(readout)] if act is not None else [])


def _message(e: BaseException, limit: int = 600) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:limit]}"


def check_model(name: str, family: str = "", *, max_params: int = MAX_PARAMS, seed: int = 0, batch: int = 2,
                candidates: Optional[list[dict]] = None, loader: Optional[Callable] = None) -> ZooResult:
    """Build ``name`` shrunk (``candidates``, default :func:`shrink_candidates`), decompose seeded random
    images at its input size and classify the outcome (see the module docstring). ``loader`` replaces
    :func:`vitdecomp.load_model` (tests)."""
    import torch

    from .engine import decompose
    from .errors import UnsupportedModuleError
    from .models import load_model

    loader = loader or load_model
    t0 = time.perf_counter()
    res = ZooResult(name, family or name.split(":", 1)[0], "build_failed")
    lm = x = z = None
    errors: list[str] = []
    over: list[str] = []
    for kw in (shrink_candidates(name) if candidates is None else candidates):
        size = meta_params(name, kw)
        if isinstance(size, str):          # the constructor refuses these overrides: no real build needed
            errors.append(f"{kw}: {size}")
            continue
        if size is not None and size > max_params:
            if not over:
                res.kwargs, res.params = kw, size
            over.append(f"{kw}: {size:,} parameters > budget {max_params:,}")
            continue
        try:
            lm = loader(name, pretrained=False, seed=seed, **kw)
            params = budget_params(lm.model)
            if params > max_params:
                if not over:
                    res.kwargs, res.params = kw, params
                over.append(f"{kw}: {params:,} parameters > budget {max_params:,}")
                lm = None
                continue
            g = torch.Generator().manual_seed(seed + 1)
            h, w = lm.image_size
            x = torch.randn(batch, 3, h, w, generator=g)
            with torch.inference_mode():
                # normalize=False: CoCa's encode_image normalises by default (CLIP's does not)
                z = (lm.model.encode_image(x, normalize=False) if lm.library == "open_clip"
                     else _timm_upstream(lm.model, x))
            res.kwargs, res.params = kw, params
            break
        except Exception as e:  # noqa: BLE001 -- any upstream constructor/forward failure: try the next build
            errors.append(f"{kw}: {_message(e, 300)}")
            lm = None
    if lm is None:
        res.status = "too_large" if over else "build_failed"
        res.message = (over or errors or ["no build tried"])[0 if over else -1]
        res.seconds = time.perf_counter() - t0
        return res
    try:
        d = decompose(lm, x)
    except UnsupportedModuleError as e:
        res.status, res.message = "refused", str(e)[:1000]
    except Exception as e:  # noqa: BLE001 -- a foreign exception is what the sweep exists to find
        res.status, res.message = "foreign", _message(e, 1000)
    else:
        zz = z.to(d.readout.dtype)
        scale = float(zz.abs().max()) or 1.0
        res.readout_error = min(float((c - zz).abs().max()) for c in _readout_candidates(lm.model, d.readout)) / scale
        res.residual = float(d.residual().max())
        ok = res.readout_error <= TOL and res.residual <= TOL
        res.status = "exact" if ok else "wrong"
        if not ok:
            res.message = f"readout error {res.readout_error:.2e}, reconstruction error {res.residual:.2e}"
    res.seconds = time.perf_counter() - t0
    return res


def _worker(conn, threads: int, max_params: int, seed: int, extensions: tuple = ()) -> None:
    import importlib
    import warnings

    import torch

    for module in extensions:          # architectures the parent registered (e.g. vitdecomp.toyworld)
        importlib.import_module(module)

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    while True:
        item = conn.recv()
        if item is None:
            return
        name, family = item
        conn.send(check_model(name, family, max_params=max_params, seed=seed).to_json())


def sweep(archs: dict[str, str], *, workers: int = 2, timeout_s: float = 300.0, max_params: int = MAX_PARAMS,
          seed: int = 0, threads: int = 1, progress: Optional[Callable[[ZooResult, int, int], None]] = None,
          ) -> list[ZooResult]:
    """Check every architecture of ``archs`` (name → family) in ``workers`` spawned processes; a model
    running longer than ``timeout_s`` is recorded as ``timeout`` and its worker replaced. Results come
    back in the order of ``archs``; ``progress(result, done, total)`` is called as they arrive."""
    from .models import extension_modules

    ctx = mp.get_context("spawn")
    extensions = extension_modules()
    todo = list(archs.items())
    total, results = len(todo), {}
    pool: list[dict] = []

    def start():
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(b, threads, max_params, seed, extensions), daemon=True)
        p.start()
        b.close()
        return {"proc": p, "conn": a, "task": None, "t": 0.0}

    def finish(r: ZooResult):
        results[r.name] = r
        log.debug("zoo %d/%d %s: %s %s", len(results), total, r.name, r.status, r.message[:120])
        if progress:
            progress(r, len(results), total)

    try:
        pool = [start() for _ in range(max(1, min(workers, total)))]
        while len(results) < total:
            for w in pool:
                if w["task"] is None and todo:
                    w["task"], w["t"] = todo.pop(0), time.monotonic()
                    w["conn"].send(w["task"])
            busy = [w for w in pool if w["task"] is not None]
            ready = wait([w["conn"] for w in busy], timeout=1.0)
            for w in list(pool):
                if w["task"] is None:
                    continue
                name, fam = w["task"]
                if w["conn"] in ready:
                    try:
                        finish(ZooResult(**w["conn"].recv()))
                        w["task"] = None
                        continue
                    except (EOFError, OSError):
                        msg = f"worker died (exit code {w['proc'].exitcode})"
                        status = "foreign"
                elif time.monotonic() - w["t"] > timeout_s:
                    msg, status = f"no result within {timeout_s:.0f} s", "timeout"
                elif w["proc"].is_alive():
                    continue
                else:
                    msg, status = f"worker died (exit code {w['proc'].exitcode})", "foreign"
                w["proc"].kill()
                w["proc"].join()
                finish(ZooResult(name, fam, status, msg, seconds=time.monotonic() - w["t"]))
                pool[pool.index(w)] = start()
    finally:
        for w in pool:
            try:
                w["conn"].send(None)
            except (OSError, BrokenPipeError):
                pass
            w["proc"].join(timeout=5)
            if w["proc"].is_alive():
                w["proc"].kill()
    return [results[n] for n in archs]


def summarize(results: Iterable[ZooResult]) -> dict:
    """Counts per family and status, the coverage fractions and the bugs.

    ``coverage``: exact / (exact + refused + foreign + wrong), over timm transformer families (the
    models that build within the budget); ``coverage_all``: exact / all swept timm architectures."""
    results = list(results)
    per: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        per[r.family][r.status] += 1
    total = Counter(r.status for r in results)

    def frac(rs, statuses=("exact", "refused", "foreign", "wrong")):
        den = sum(1 for r in rs if r.status in statuses)
        return (sum(1 for r in rs if r.status == "exact") / den) if den else 0.0

    timm_rs = [r for r in results if r.name.startswith("timm:")]
    oc_rs = [r for r in results if r.name.startswith("open_clip:")]
    return {
        "families": {f: dict(c) for f, c in sorted(per.items())},
        "total": dict(total),
        "coverage": frac(timm_rs),
        "coverage_all": frac(timm_rs, STATUSES),
        "open_clip_coverage": frac(oc_rs),
        "bugs": [r.to_json() for r in results if r.status in BUGS],
        "n": len(results),
    }


def to_json(results: Sequence[ZooResult], meta: Optional[dict] = None) -> dict:
    """A results document (what ``benchmark zoo --out`` writes): versions, the summary, every result."""
    import open_clip
    import timm
    import torch

    from .version import __version__

    return {"versions": {"vitdecomp": __version__, "timm": timm.__version__, "open_clip": open_clip.__version__,
                         "torch": torch.__version__},
            "meta": meta or {}, "summary": summarize(results), "results": [r.to_json() for r in results]}


def from_json(doc: dict) -> list[ZooResult]:
    return [ZooResult(**r) for r in doc["results"]]


README_BEGIN = "<!-- zoo-table:begin (generated by `python jobs/benchmark.py zoo --write-readme`) -->"
README_END = "<!-- zoo-table:end -->"


def readme_table(doc: dict) -> str:
    """The README "Supported models (zoo sweep)" table of a results document: per family, how many
    architectures decompose exactly, are refused, fail upstream or are over the budget, and examples."""
    results = from_json(doc)
    s = summarize(results)
    by_fam: dict[str, list[ZooResult]] = defaultdict(list)
    for r in results:
        by_fam[r.family].append(r)
    v = doc.get("versions", {})
    lines = [f"Swept with timm {v.get('timm', '?')}, open_clip {v.get('open_clip', '?')}: "
             f"{s['total'].get('exact', 0)} of {s['n']} architectures decompose exactly; timm transformer "
             f"families {s['coverage']:.0%} exact of those that build within the budget "
             f"({s['coverage_all']:.0%} of all), open_clip {s['open_clip_coverage']:.0%}.", "",
             "| family | exact | refused | build failed / too large / timeout | bugs | exact examples |",
             "|---|---:|---:|---:|---:|---|"]
    for fam in sorted(by_fam, key=lambda f: (f == OPEN_CLIP_FAMILY, f)):
        rs = by_fam[fam]
        c = Counter(r.status for r in rs)
        ex = [r.name.split(":", 1)[1] for r in rs if r.status == "exact"][:3]
        lines.append(f"| {fam} | {c['exact']}/{len(rs)} | {c['refused']} | "
                     f"{c['build_failed'] + c['too_large'] + c['timeout']} | {c['foreign'] + c['wrong']} | "
                     f"{', '.join(f'`{e}`' for e in ex)} |")
    return "\n".join(lines)


def replace_readme_table(text: str, table: str) -> str:
    """``text`` with the part between :data:`README_BEGIN` and :data:`README_END` replaced by ``table``."""
    from .errors import InputError

    if README_BEGIN not in text or README_END not in text:
        raise InputError(f"the README has no zoo table markers; add the two lines {README_BEGIN!r} and "
                         f"{README_END!r} where the table goes")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}"
