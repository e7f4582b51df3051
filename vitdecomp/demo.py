"""``vitdecomp demo``: the one-command offline demo.

Until the toy world lands (its trained tiny models and the decompose → fit → query pipeline), the
demo decomposes a drawn image with a random-initialised model and prints its largest components.
"""
from __future__ import annotations

import argparse

import torch


def example_image(size: int = 224):
    """A drawn RGB image (no files, no downloads): a red disc on a blue-green background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 120, 140))
    draw = ImageDraw.Draw(img)
    draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(220, 40, 30))
    draw.rectangle([0, 3 * size // 4, size, size], fill=(90, 160, 60))
    return img


def run(model: str = "timm:deit_tiny_patch16_224", top: int = 10, seed: int = 0) -> dict:
    import vitdecomp as vd

    torch.manual_seed(seed)
    lm = vd.load_model(model, pretrained=False)
    x = lm.transform(example_image())[None]
    d = vd.decompose(lm, x)
    print(f"model {lm.name} (random init), readout {lm.readout.kind} d={lm.readout.dim}, "
          f"{len(d.names)} components")
    print(f"reconstruction error ||sum c_k - z|| / ||z|| = {float(d.residual()[0]):.2e}")
    print(f"largest components along the readout direction (terms sum to ||z|| = {float(d.readout[0].norm()):.3f}):")
    for name, score in d.top(0, n=top):
        print(f"  {name:<28s} {score:+.4f}")
    print("missing from this demo until they land: toy world, decompose job, fit, query, report")
    return {"decomposition": d, "model": lm}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo (no downloads)",
                       description="Offline demo: decompose a drawn image with a random-initialised model "
                                   "and list its largest components.")
    p.add_argument("--model", default="timm:deit_tiny_patch16_224", help="timm:<name> or open_clip:<arch>")
    p.add_argument("--top", type=int, default=10, help="how many components to list")
    p.set_defaults(func=lambda a: run(a.model, a.top) and None)
