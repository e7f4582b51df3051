"""``vitdecomp benchmark overhead | job | toyworld``: measured ratios, printed."""
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
    print(f"  reconstruction error max = {r['residual']:.2e}")



def print_job(r: dict) -> None:
    print(f"job  model={r['model']} format={r['format']} N={r['images']} components={r['components']} d={r['d']}")
    print(f"  readout-only job  {r['plain_images_per_s']:.1f} images/s steady "
          f"({r['plain_wall_images_per_s']:.1f} incl. start-up)")
    print(f"  decompose job     {r['decompose_images_per_s']:.1f} images/s steady "
          f"({r['decompose_wall_images_per_s']:.1f} incl. start-up)   ratio {r['throughput_ratio']:.3f} (target >= 0.8)")
    print(f"  peak memory (driver + local Ray)  N: {r['peak_mib_n']:.0f} MiB   {r['scale']}N: {r['peak_mib_10n']:.0f} "
          f"MiB   ratio {r['memory_ratio']:.3f} (target <= 1.1)")
    print(f"  stored bytes/image {r['bytes_per_image']:.0f} = {r['bytes_ratio']:.3f} x components*d*2 (target <= 1.05)")



def print_toyworld(r: dict) -> None:
    import numpy as np

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
                                    "as a control), over several training seeds; TextSpan's first texts per head. "
                                    "Trains missing seeds' models (about 1.5 min each) into the demo's cache.")
    t.add_argument("--seeds", type=int, default=3, help="classifier training seeds (default 3)")
    t.add_argument("--k", type=int, nargs="+", default=[5, 8], help="numbers of ablated components (default 5 8)")
    t.add_argument("--workdir", default=".vitdecomp-demo", help="the demo's working directory (world and cache)")
    t.set_defaults(func=lambda a: print_toyworld(_lib().toyworld(a.seeds, tuple(a.k), a.workdir)))
    o.set_defaults(func=lambda a: print_overhead(_lib().overhead(a.model, a.batch, a.reps, a.device, a.dtype, a.heads,
                                                          threads=a.threads)))




def _lib():
    from .. import benchmark

    return benchmark
