"""``vitdecomp benchmark overhead | job | toyworld | … | zoo``: measured ratios and counts, printed."""
from __future__ import annotations

import argparse



def print_overhead(r: dict) -> None:
    print(f"overhead  model={r['model']} device={r['device']} dtype={r['dtype']} batch={r['batch']} "
          f"reps={r['reps']} components={r['components']} d={r['d']}")
    print(f"  plain forward     median {r['plain_s']:.3f} s   peak +{r['plain_peak_mib']:.0f} MiB")
    print(f"  decompose (heads) median {r['decompose_s']:.3f} s   peak +{r['decompose_peak_mib']:.0f} MiB "
          f"(contributions {r['contributions_mib']:.1f} MiB)")
    print(f"  ratio decompose/plain = {r['ratio']:.3f}  (per repetition: "
          + ", ".join(f"{v:.3f}" for v in r["ratio_per_rep"]) + ")")
    if r.get("cpu_ratio") == r.get("cpu_ratio"):
        print(f"  CPU time of the process: {r['plain_cpu_s']:.3f} s vs {r['decompose_cpu_s']:.3f} s, "
              f"ratio {r['cpu_ratio']:.3f}")
    print(f"  reconstruction error max = {r['residual']:.2e}")


def print_overhead_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['family']:<20} {r['model']:<40} failed: {r['error']}", flush=True)
        return
    reps = r["ratio_per_rep"]
    print(f"  {r['family']:<20} {r['model']:<40} {r['plain_s']:7.3f} {r['decompose_s']:7.3f} {r['ratio']:6.3f}x "
          f"({min(reps):.2f}-{max(reps):.2f}) {r['cpu_ratio']:6.3f}x  {r['plain_peak_mib']:6.0f} "
          f"{r['decompose_peak_mib']:6.0f} {r['mem_ratio']:5.2f}x  {r['residual']:.1e}", flush=True)


def _overhead(a) -> None:
    if not a.families:
        print_overhead(_lib().overhead(a.model, a.batch, a.reps, a.device, a.dtype, a.heads, threads=a.threads))
        return
    fams = "all" if a.families == "all" else [f.strip() for f in a.families.split(",") if f.strip()]
    print(f"overhead per family  size={a.size} batch={a.batch} reps={a.reps} heads={a.heads} threads={a.threads} "
          "(fp32, random init; time = median; peak = memory growth of one call)")
    print(f"  {'family':<20} {'model':<40} {'plain':>7} {'decomp':>7} {'wall':>7} {'(reps)':<11} {'CPU':>7}  "
          f"{'peak':>6} {'decomp':>6} {'mem':>6}  error")
    print(f"  {'':<20} {'':<40} {'s':>7} {'s':>7} {'ratio':>7} {'':<11} {'ratio':>7}  {'MiB':>6} {'MiB':>6} "
          f"{'ratio':>6}")
    rows = _lib().overhead_families(fams, a.size, a.batch, a.reps, a.device, a.heads, a.threads,
                                    progress=print_overhead_row)
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst_t, worst_m = max(ok, key=lambda r: r["ratio"]), max(ok, key=lambda r: r["mem_ratio"])
        worst_c = max(ok, key=lambda r: r["cpu_ratio"] if r["cpu_ratio"] == r["cpu_ratio"] else 0.0)
        print(f"  worst wall-clock ratio {worst_t['ratio']:.3f}x ({worst_t['family']}), worst CPU-time ratio "
              f"{worst_c['cpu_ratio']:.3f}x ({worst_c['family']}), worst peak-memory ratio "
              f"{worst_m['mem_ratio']:.2f}x ({worst_m['family']}); targets <= 1.15x time, <= 1.2x memory")



def print_job(r: dict) -> None:
    print(f"job  model={r['model']} format={r['format']} N={r['images']} components={r['components']} d={r['d']}")
    print(f"  readout-only job  {r['plain_images_per_s']:.1f} images/s steady "
          f"({r['plain_wall_images_per_s']:.1f} incl. start-up)")
    print(f"  decompose job     {r['decompose_images_per_s']:.1f} images/s steady "
          f"({r['decompose_wall_images_per_s']:.1f} incl. start-up)   ratio {r['throughput_ratio']:.3f} (target >= 0.8)")
    print(f"  peak memory (driver + local Ray)  N: {r['peak_mib_n']:.0f} MiB   {r['scale']}N: {r['peak_mib_10n']:.0f} "
          f"MiB   ratio {r['memory_ratio']:.3f} (target <= 1.1)")
    print(f"  stored bytes/image {r['bytes_per_image']:.0f} = {r['bytes_ratio']:.3f} x the fp16 payload of the "
          f"component columns ({r.get('layout', 'full')} layout; components*d*2 when full) (target <= 1.05)")



def print_toyworld(r: dict, json_path=None) -> None:
    import numpy as np

    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(r, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

    print("toyworld  tiny CLIP zero-shot accuracy (test): " +
          ", ".join(f"{a} {v:.3f}" for a, v in r["zero_shot"].items()))
    print(f"  classifier per-group accuracy on test, {len(r['runs'])} seeds (mean ± sd):")
    keys = ["before"] + [f"{p}{k}" for k in r["ks"] for p in ("top", "compattribute", "random")
                         if f"{p}{k}" in r["runs"][0]]
    for key in keys:
        worst = [run[key]["worst"] for run in r["runs"]]
        mean = [run[key]["mean"] for run in r["runs"]]
        groups = r["runs"][0][key]["groups"]
        print(f"    {key.replace('top', 'signed'):<14s} worst-group {np.mean(worst):.3f} ± {np.std(worst):.3f}   mean-group {np.mean(mean):.3f}   "
              f"(seed 0: " + ", ".join(f"{g} {a:.2f}" for g, a in groups.items()) + ")")
    for k in r["ks"]:
        gain = [run[f"top{k}"]["worst"] - run["before"]["worst"] for run in r["runs"]]
        print(f"    signed top-{k} ablation changes worst-group by {np.mean(gain) * 100:+.1f} points "
              f"(per seed: {', '.join(f'{g * 100:+.1f}' for g in gain)}); target +10")
        print(f"      ablated (seed 0): {', '.join(r['runs'][0][f'top{k}']['ablated'])}")
    print("  TextSpan on the tiny CLIP's heads (test split): first texts and their attribute")
    for name, picks in r["textspan"].items():
        print(f"    {name:<34s} " + " | ".join(f"{t} [{a}]" for t, a in picks))
    if "ranking" in r["runs"][0]:
        print("  do the components ranked highest for the background property do it? (validation split; "
              "'gain' = worst-group gain when a component alone is mean-ablated)")
        rk = [run["ranking"] for run in r["runs"]]
        for name in ("compattribute", "signed"):
            print(f"    {name:<13s} ranking: Spearman with gain {np.mean([x[f'spearman_{name}_vs_gain'] for x in rk]):+.2f}; "
                  + ", ".join(f"top-{k} overlap with the top-{k} by gain {np.mean([x[f'overlap{k}_{name}'] for x in rk]):.2f}"
                              for k in r["ks"]))
        print(f"    top by gain (seed 0): {', '.join(rk[0]['gain_top'])}")
        for k in r["ks"]:
            gain = [run[f"compattribute{k}"]["worst"] - run["before"]["worst"] for run in r["runs"]]
            print(f"    CompAttribute top-{k} ablation changes test worst-group by {np.mean(gain) * 100:+.1f} points "
                  f"(per seed: {', '.join(f'{g * 100:+.1f}' for g in gain)}); ablated (seed 0): "
                  f"{', '.join(r['runs'][0][f'compattribute{k}']['ablated'])}")
    if "scores" in r["runs"][0]:
        print(f"  CompAttribute ranking per score option (query compattribute/mitigate --score; aligner "
              f"{r.get('align_epochs', 15)} epochs; target: >= +8 worst-group points, top component differing "
              "between at least half of the properties)")
        for score in r["runs"][0]["scores"]:
            sr = [run["scores"][score] for run in r["runs"]]
            parts = []
            for k in r["ks"]:
                gain = [(x[f"top{k}"]["worst"] - run["before"]["worst"]) * 100 for x, run in zip(sr, r["runs"])]
                parts.append(f"top-{k} {np.mean(gain):+.1f} points (per seed {', '.join(f'{g:+.1f}' for g in gain)}), "
                             f"overlap {np.mean([x[f'overlap{k}'] for x in sr]):.2f}")
            print(f"    {score:<15s} Spearman with gain {np.mean([x['spearman_vs_gain'] for x in sr]):+.2f}; "
                  + "; ".join(parts))
            print(f"      distinct top components over the {len(sr[0]['top_per_property'])} world properties "
                  f"(classifier, aligned; per seed): {', '.join(str(x['distinct_tops']) for x in sr)}; seed 0: "
                  + ", ".join(f"{p}: {c}" for p, c in sr[0]["top_per_property"].items()))
            cs = r.get("clip_scores", {}).get(score)
            if cs:
                print(f"      tiny CLIP's own store: {cs['distinct']} distinct top components ("
                      + ", ".join(f"{p}: {c}" for p, c in zip(r["properties"], cs["tops"]))
                      + f"); background head {cs['background_head']}, first TextSpan text "
                        f"{cs['background_head_first_text']!r}")

def print_resume(r: dict) -> None:
    print(f"resume  store of {r['rows']} ids ({r['format']}), listing of {r['listing']} inputs "
          f"(store ready in {r['build_s']:.1f} s)")
    for mode, text in (("empty", "no store (baseline)        "), ("old", "driver-side id set (before) "),
                       ("new", "streamed anti-join (now)    ")):
        x = r[mode]
        print(f"  {text} {x['seconds']:6.2f} s   peak RSS +{x['added_mib']:6.1f} MiB over the listing   "
              f"{x['todo']} to do")
    new, old = r["new"], r["old"]
    print(f"  now vs before: {new['seconds'] / max(old['seconds'], 1e-9):.2f}x the time, "
          f"{new['added_mib'] / max(old['added_mib'], 1e-9):.2f}x the memory "
          f"(targets: <= 30 s and <= 100 MB at 1M ids: {'met' if new['seconds'] <= 30 and new['added_mib'] <= 100 else 'NOT met'})")
    print(f"  one read task's in-task anti-join of {r['block']} ids: {new['task_s']:.2f} s")


def print_explorer(r: dict) -> None:
    print(f"explorer  synthetic store of {r['rows']:,} rows ({r['layout']} layout, d={r['d']}, {r['components']} "
          f"components) at {r['store']} (written/opened in {r['write_s']:.1f} s)")
    print(f"  time to first page      {r['first_page_s']:.2f} s  (open the store, start the app, serve /; target <= 3 s)")
    print(f"  cold start              {r['cold_start_s']:.2f} s  (`vitdecomp serve` in a fresh process, imports included, "
          "to its first page)")
    print(f"  per-head page (picker)  {r['heads_page_s']:.2f} s")
    print(f"  vector index of {r['component']}: {r['index_s']:.1f} s" + (" (cached)" if r["index_cached"] else " (built)"))
    print(f"  nearest-neighbour query {r['query_median_s']:.3f} s median, {r['query_max_s']:.3f} s max over "
          f"{len(r['query_s'])} probes (page rendered; target <= 1 s)")
    if r["exact_s"] is not None:
        print(f"  exact scan of the same query {r['exact_s']:.2f} s = {r['exact_s'] / r['query_median_s']:.0f}x the "
              "indexed query")


def print_scale(r: dict) -> None:
    sh = r["shape"]
    print(f"scale  synthetic stores (d={sh['d']}, {sh['blocks']} blocks x {sh['heads']} heads, head_dim "
          f"{sh['head_dim']}, fp16, lance) in {r['workdir']}")
    passes = [p for p in ("textspan", "compattribute", "ablate") if p in r["sizes"][0]["full"]]
    for e in r["sizes"]:
        print(f"  N={e['rows']:,}")
        for layout in ("full", "compact"):
            x = e[layout]
            print(f"    {layout:<8s} {x['bytes_per_image']:8.0f} B/image  raw scan (all columns) {x['scan']:6.2f} s  " +
                  "  ".join(f"{p} {x[p]:6.2f} s = {x[p] / x.get('scan_' + p, x['scan']):.2f}x its scan" for p in passes)
                  + f"  peak RSS {x['peak_rss_mib']:.0f} MiB  (load {x.get('load', float('nan')):.1f})")
        print("    compact vs full: bytes " + f"{e['full']['bytes_per_image'] / e['compact']['bytes_per_image']:.2f}x "
              "smaller; speedup " + ", ".join(f"{p} {e['full'][p] / e['compact'][p]:.2f}x" for p in passes))
    if len(r["sizes"]) > 1:
        a, b = r["sizes"][-2], r["sizes"][-1]
        print(f"  peak RSS {b['rows']:,} vs {a['rows']:,} rows: " + ", ".join(
            f"{layout} {b[layout]['peak_rss_mib'] / a[layout]['peak_rss_mib']:.2f}x" for layout in ("full", "compact"))
            + " (goal <= 1.1)")
    print("  goals: each pass <= 1.3x a raw Lance scan of its own columns (query ablate: two scans, the means "
          "and the masked predictions); load = 1-min load average of this shared machine during the passes")


def print_layout_bytes(rows: list) -> None:
    print("layout  bytes per image, fp16, compact vs full (random weights; error vs the fp32 in-process decomposition)")
    for r in rows:
        f, c = r["full"], r["compact"]
        print(f"  {r['model']} blocks {r['blocks']} ({r['components']} components, d={r['d']}): full "
              f"{f['bytes_per_image'] / 1024:.1f} KiB, compact {c['bytes_per_image'] / 1024:.1f} KiB = 1/"
              f"{f['bytes_per_image'] / c['bytes_per_image']:.2f}; head columns alone 1/{f['head_bytes'] / max(c['head_bytes'], 1):.2f}")
        print(f"    max relative error per component: full {f['max_rel_error']:.2e}, compact {c['max_rel_error']:.2e} "
              f"({c['max_rel_error'] / max(f['max_rel_error'], 1e-30):.2f}x; heads {c['max_rel_error_heads']:.2e} vs "
              f"{f['max_rel_error_heads']:.2e})")
    print("  targets: ViT-B/16 all blocks <= 1/5, open_clip ViT-B-16 <= 1/4, last 4 blocks' heads <= 1/7; error <= 1.5x full")


def _layout_rows(a) -> list:
    lib = _lib()
    return [lib.layout_bytes("timm:vit_base_patch16_224", images=a.images),
            lib.layout_bytes("open_clip:ViT-B-16", images=a.images),
            lib.layout_bytes("timm:vit_base_patch16_224", blocks=range(8, 12), images=a.images)]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="performance benchmarks (ratios measured in one run)",
                       description="Performance benchmarks. Each prints the ratios its targets are stated in.")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    o = bsub.add_parser("overhead", help="plain forward vs per-head decomposition, same model and batch",
                        description="Time a plain forward and a per-head decomposition of the same random-"
                                    "initialised model on the same batch in one process (interleaved repetitions, "
                                    "medians), print both, their ratio and the peak memory of one call of each (fp32). Target: <= 1.15x on CPU, "
                                    "<= 1.1x on GPU for timm:vit_base_patch16_224, batch 32.")
    o.add_argument("--model", default="timm:vit_base_patch16_224", help="timm:<name> or open_clip:<arch> (random init)")
    o.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    o.add_argument("--reps", type=int, default=5, help="timed repetitions of each mode (default 5)")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="fp32, or autocast bf16/fp16")
    o.add_argument("--no-heads", dest="heads", action="store_false", help="layer granularity instead of heads")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    o.add_argument("--families", default=None, metavar="LIST",
                   help="instead of --model: the stand-ins of these supported families (comma list of "
                        "vitdecomp.models.supported_families() labels, or 'all'), one table row each")
    o.add_argument("--size", choices=["full", "small"], default="full",
                   help="with --families: the stand-in's default sizes (full) or the tests' small build")
    j = bsub.add_parser("job", help="decompose job vs readout-only job: images/s, memory at N and 10N, bytes/image",
                        description="Run the decompose job and a plain embedding job (same pipeline, readout only) "
                                    "on the same generated images; print images/s of both and their ratio (target "
                                    ">= 0.8), peak memory at N and 10N images (target <= 1.1x) and stored bytes per "
                                    "image / (components x d x 2) (target <= 1.05).")
    j.add_argument("--model", default="timm:deit_tiny_patch16_224", help="model (random init)")
    j.add_argument("--images", type=int, default=500, help="N (default 500)")
    j.add_argument("--scale", type=int, default=10, help="memory is compared at N and scale*N (default 10)")
    j.add_argument("--format", default="lance", choices=["lance", "parquet"])
    j.add_argument("--batch-size", type=int, default=32)
    j.add_argument("--workdir", default=None, help="where images and stores go (default: a temp dir)")
    j.set_defaults(func=lambda a: print_job(_lib().job(a.model, a.images, a.scale, a.format, a.batch_size, a.workdir)))
    t = bsub.add_parser("toyworld", help="planted-truth figures of the toy world",
                        description="Tiny-CLIP zero-shot accuracy per attribute; classifier per-group and worst-group "
                                    "accuracy before and after mean-ablating the components that push towards the "
                                    "background's class (ranked on validation, evaluated on test; random components "
                                    "as a control), over several training seeds; TextSpan's first texts per head; the CompAttribute "
                                    "ranking for every --score option (correlation, specific, variance-share). "
                                    "Trains missing seeds' models (about 1.5 min each) into the demo's cache.")
    t.add_argument("--seeds", type=int, default=3, help="classifier training seeds (default 3)")
    t.add_argument("--k", type=int, nargs="+", default=[5, 8], help="numbers of ablated components (default 5 8)")
    t.add_argument("--workdir", default=".vitdecomp-demo", help="the demo's working directory (world and cache)")
    t.add_argument("--align-epochs", type=int, default=15,
                   help="epochs of the CompAlign aligner behind the CompAttribute rankings (default 15)")
    t.add_argument("--json", default=None, help="also write every measured figure to this JSON file")
    t.set_defaults(func=lambda a: print_toyworld(_lib().toyworld(a.seeds, tuple(a.k), a.workdir, a.align_epochs),
                                                 a.json))
    r = bsub.add_parser("resume", help="resume planning against a store of N ids: driver seconds and memory",
                        description="Write a store holding N image ids (minimal schema, no model run; reused when "
                                    "present), then plan a resume for a listing of N·(1+new) inputs, each way in a "
                                    "fresh process: the old driver-side id set vs the streamed anti-join (and one "
                                    "read task's in-task anti-join). Prints seconds and peak RSS growth over holding "
                                    "the listing. Targets at 1M ids: <= 30 s and <= 100 MB.")
    r.add_argument("--rows", type=int, default=1_000_000, help="ids in the store (default 1000000)")
    r.add_argument("--new", type=float, default=0.1, help="share of inputs not yet stored (default 0.1)")
    r.add_argument("--format", default="lance", choices=["lance", "parquet"], help="store format (default lance)")
    r.add_argument("--workdir", default=None, help="where the store goes (default: a temp dir)")
    r.set_defaults(func=lambda a: print_resume(_lib().resume(a.rows, a.new, a.format, a.workdir)))
    e = bsub.add_parser("explorer", help="the explorer on a synthetic store: first page, index build, NN query",
                        description="Write a synthetic store of N rows (reused when present), start the explorer on "
                                    "it and time the first page over HTTP, the Lance vector index of one head and "
                                    "nearest-neighbour queries through it (against one exact scan). Targets at 1M "
                                    "rows: first page <= 3 s, a query <= 1 s once the index exists.")
    e.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic store (default 1000000)")
    e.add_argument("--layout", default="compact", choices=["compact", "full"], help="store layout (default compact)")
    e.add_argument("--d", type=int, default=128, help="readout dimension (default 128)")
    e.add_argument("--queries", type=int, default=5, help="timed queries (default 5)")
    e.add_argument("--no-exact", dest="exact", action="store_false", help="skip the exact-scan comparison")
    e.add_argument("--workdir", default=None, help="where the store and the index cache go (default: a temp dir)")
    e.set_defaults(func=lambda a: print_explorer(_lib().explorer(a.rows, a.workdir, a.layout, a.d,
                                                                 queries=a.queries, exact=a.exact)))
    sc = bsub.add_parser("scale", help="synthetic stores of N rows, both layouts: passes vs a raw scan, RSS, bytes",
                         description="Write synthetic stores (random coefficients with planted structure, a real "
                                     "manifest, no model run; full and compact layouts; reused when present) and run "
                                     "fit textspan, query compattribute and query ablate on each in a fresh process. "
                                     "Prints per N: seconds per pass / a raw Lance scan of the same columns (goal <= "
                                     "1.3), peak RSS (goal <= 1.1x from 100k to 1M rows), bytes per image and the "
                                     "compact-vs-full speedup.")
    sc.add_argument("--rows", default="10000,100000", help="comma-separated store sizes (default 10000,100000)")
    sc.add_argument("--shape", default="128,4,4,32", help="d,blocks,heads,head_dim (default 128,4,4,32; ViT-B: 768,12,12,64)")
    sc.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    sc.set_defaults(func=lambda a: print_scale(_lib().scale(
        [int(v) for v in a.rows.split(",")], a.workdir,
        dict(zip(("d", "blocks", "heads", "head_dim"), (int(v) for v in a.shape.split(",")))))))
    lb = bsub.add_parser("layout", help="bytes per image and error of the compact vs full layout for ViT-B models",
                         description="Decompose a few random images with timm vit_base_patch16_224 (all blocks, and "
                                     "the last 4 blocks) and open_clip ViT-B-16 (random weights), store them fp16 in "
                                     "both layouts and print bytes per image and per-component max relative error vs "
                                     "the fp32 in-process decomposition.")
    lb.add_argument("--images", type=int, default=4, help="images decomposed (default 4)")
    lb.set_defaults(func=lambda a: print_layout_bytes(_layout_rows(a)))
    o.set_defaults(func=_overhead)
    z = bsub.add_parser("zoo", help="every transformer-family timm and open_clip architecture: exact or refused?",
                        description="Build every timm model of the transformer-family modules (vitdecomp.zoo."
                                    "TIMM_TRANSFORMER_MODULES) and every open_clip architecture shrunk, with random "
                                    "weights; decompose random images and classify each: exact, refused "
                                    "(UnsupportedModuleError), foreign exception or wrong answer (bugs), too large, "
                                    "build failed (upstream), timeout. Prints counts per family, the coverage and "
                                    "the bugs. With --write-readme RESULTS.json only regenerates the README table.")
    z.add_argument("--timm", default="", metavar="PATTERN", help="only timm models matching this fnmatch pattern")
    z.add_argument("--open-clip", default="", metavar="PATTERN", help="only open_clip architectures matching this")
    z.add_argument("--only", choices=["timm", "open_clip"], default=None, help="sweep one library only")
    z.add_argument("--limit", type=int, default=None, help="the first N architectures (name order)")
    z.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    z.add_argument("--timeout", type=float, default=300.0, help="seconds per model before it counts as timeout")
    z.add_argument("--max-params", type=int, default=None, help="parameter budget of a shrunk build (default 60M)")
    z.add_argument("--out", default=None, help="write every result to this JSON file (results so far go to "
                   "OUT.partial.jsonl; rerunning with the same --out resumes)")
    z.add_argument("--progress", action="store_true", help="print each result as it arrives")
    z.add_argument("--write-readme", default=None, metavar="RESULTS_JSON",
                   help="regenerate README.md's zoo table from a results file (no sweep)")
    z.set_defaults(func=_zoo)




def print_zoo(doc: dict) -> None:
    s = doc["summary"]
    print(f"zoo  {s['n']} architectures  timm {doc['versions']['timm']}  open_clip {doc['versions']['open_clip']}  "
          f"({doc['meta'].get('seconds', 0):.0f} s)")
    statuses = ("exact", "refused", "foreign", "wrong", "too_large", "build_failed", "timeout")
    print(f"  {'family':<28}" + "".join(f"{k:>13}" for k in statuses))
    for fam, c in s["families"].items():
        print(f"  {fam:<28}" + "".join(f"{c.get(k, 0):>13}" for k in statuses))
    print(f"  {'total':<28}" + "".join(f"{s['total'].get(k, 0):>13}" for k in statuses))
    print(f"  timm transformer families: {s['coverage']:.1%} exact of those that build within the budget "
          f"({s['coverage_all']:.1%} of all swept); open_clip: {s['open_clip_coverage']:.1%}")
    print(f"  bugs (foreign exception or wrong answer): {len(s['bugs'])}")
    for b in s["bugs"]:
        print(f"    {b['name']}: {b['status']}: {b['message'][:300]}")


def _zoo(a) -> None:
    if a.write_readme:
        print(_lib().zoo_readme(a.write_readme))
        return
    libs = (a.only,) if a.only else ("timm", "open_clip")
    progress = (lambda r, i, n: print(f"  [{i}/{n}] {r.name}: {r.status} {r.message[:160]}", flush=True)) \
        if a.progress else None
    print_zoo(_lib().zoo(a.timm, a.open_clip, libs, a.workers, a.timeout, a.max_params, a.limit, a.out, progress))


def _lib():
    from .. import benchmark

    return benchmark
