"""``vitdecomp demo``: the offline demo on the built-in toy world (``--quick``: one image, seconds)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..toyworld import demo

    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.quick:
        demo.quick(args.model, progress=say)
    else:
        demo.run(args.workdir, args.small, args.seed, progress=say, retrain=args.retrain,
                 export_weights=args.export_weights)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo on the built-in toy world (no downloads)",
                       description="Generate the toy world, load its tiny classifier and CLIP (shipped with vitdecomp; "
                                   "--retrain trains them here), report "
                                   "their planted-truth accuracies, decompose both into Lance stores with the "
                                   "decompose job on a local Ray, fit CompAlign and TextSpan, run every query and "
                                   "write one HTML report per store. Reruns reuse the cached world and models.")
    p.add_argument("--workdir", default=".vitdecomp-demo",
                   help="where the world, models and stores go (default: .vitdecomp-demo)")
    p.add_argument("--small", action="store_true",
                   help="a world of a few hundred images (a smoke test; with --retrain, a few epochs)")
    p.add_argument("--retrain", action="store_true",
                   help="train the two tiny models here instead of using the weights shipped with vitdecomp "
                        "(about 6 minutes on 2 idle cores; cached)")
    p.add_argument("--export-weights", metavar="DIR",
                   help="with --retrain: write the trained models as shipped weights (fp16 safetensors + "
                        "weights.json with their SHA-256, training config and measured accuracies) to DIR; "
                        "the package's own are in vitdecomp/toyworld/weights")
    p.add_argument("--seed", type=int, default=0, help="world and training seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="only decompose one drawn image with a random-init model")
    p.add_argument("--model", default="timm:deit_tiny_patch16_224",
                   help="--quick: the model (default: timm:deit_tiny_patch16_224)")
    p.set_defaults(func=run)
