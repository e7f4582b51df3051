"""One worked example per command, shown at the end of its ``--help`` (and checked by the tests:
every leaf command has a description and an example).

The paths follow the demo's layout (``vitdecomp demo`` writes ``.vitdecomp-demo/stores/clip`` …),
so each example can be pasted after a demo run with only the paths changed.
"""
from __future__ import annotations

import argparse
import textwrap

DEMO = ".vitdecomp-demo"
EXAMPLES: dict[tuple[str, ...], str] = {
    (): "vitdecomp demo                      # the toy world, offline, end to end\n"
        "vitdecomp decompose --help          # then any command's --help",
    ("demo",): "vitdecomp demo --workdir /tmp/vd-demo",
    ("decompose",): "vitdecomp decompose --input images/ --output stores/deit --model timm:deit_base_patch16_224 "
                    "--pretrained fb_in1k",
    ("fit", "compalign"): f"vitdecomp fit compalign --store {DEMO}/stores/classifier --out fit/aligner",
    ("fit", "textspan"): f"vitdecomp fit textspan --store {DEMO}/stores/clip --pool {DEMO}/world-pool.txt "
                         f"--clip-checkpoint vitdecomp/toyworld/weights/clip.safetensors --out fit/textspan",
    ("fit", "probe"): f"vitdecomp fit probe --store {DEMO}/stores/classifier --label-column label --out fit/probe",
    ("query", "compattribute"): f"vitdecomp query compattribute --store {DEMO}/stores/clip "
                                f"--properties properties.json --out query/clip",
    ("query", "retrieve"): f"vitdecomp query retrieve --store {DEMO}/stores/clip --text 'a red object' "
                           f"--out query/clip",
    ("query", "ablate"): f"vitdecomp query ablate --store {DEMO}/stores/classifier --label-column label "
                         f"--head model --out query/classifier",
    ("query", "mitigate"): f"vitdecomp query mitigate --store {DEMO}/stores/classifier --label-column label "
                           f"--group-column background --spurious 'world background' --head model --out query/classifier",
    ("query", "heatmap"): f"vitdecomp query heatmap --store {DEMO}/stores/clip --image-ids test-000001 "
                          f"--text 'a red object' --out query/clip",
    ("query", "report"): "vitdecomp query report --out query/clip",
    ("query", "interpretability"): f"vitdecomp query interpretability --textspan {DEMO}/fit/textspan-clip "
                                   f"--properties {DEMO}/world-properties.yaml --out query/clip",
    ("serve",): f"vitdecomp serve --store {DEMO}/stores/clip --fit {DEMO}/fit/textspan-clip --query {DEMO}/query/clip "
                f"--checkpoint vitdecomp/toyworld/weights/clip.safetensors",
    ("store", "check"): f"vitdecomp store check {DEMO}/stores/clip",
    ("store", "repair"): f"vitdecomp store repair {DEMO}/stores/clip --apply",
    ("benchmark",): "vitdecomp benchmark overhead --model timm:vit_base_patch16_224",
    ("benchmark", "overhead"): "vitdecomp benchmark overhead --model timm:vit_base_patch16_224 --batch 32",
    ("benchmark", "job"): "vitdecomp benchmark job --images 200",
    ("benchmark", "toyworld"): "vitdecomp benchmark toyworld --seeds 3",
    ("benchmark", "explorer"): "vitdecomp benchmark explorer --rows 1000000 --workdir /tmp/vd-explorer",
    ("benchmark", "scale"): "vitdecomp benchmark scale --rows 10000,100000,1000000 --workdir /tmp/vd-scale",
    ("benchmark", "layout"): "vitdecomp benchmark layout --images 32",
    ("benchmark", "zoo"): "vitdecomp benchmark zoo --out docs/zoo.json\n"
                          "vitdecomp benchmark zoo --write-readme docs/zoo.json",
    ("reproduce", "waterbirds"): "vitdecomp reproduce waterbirds --root data/waterbird_complete95_forest2water2 "
                                 "--models deit_b,clip_b16 --pretrained --out repro/waterbirds",
    ("reproduce", "imagenet-ablation"): "vitdecomp reproduce imagenet-ablation --root data/imagenet --model clip_b16 "
                                        "--pretrained --out repro/imagenet",
    ("reproduce", "segmentation"): "vitdecomp reproduce segmentation --root data/imagenet-seg --model deit_b "
                                   "--pretrained --out repro/seg",
    ("benchmark", "resume"): "vitdecomp benchmark resume --rows 1000000 --workdir /tmp/vd-resume",
    ("store", "vacuum"): f"vitdecomp store vacuum {DEMO}/stores/clip",
}


class Formatter(argparse.HelpFormatter):
    """Descriptions are re-wrapped as usual; the epilog (the example) keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:") or text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(parser: argparse.ArgumentParser, path: tuple = ()):
    """Every parser of the tree with its command path (the root is ``()``)."""
    yield path, parser
    for name, sub in subparsers(parser).items():
        yield from walk(sub, path + (name,))


def finish(root: argparse.ArgumentParser) -> None:
    """Give every parser of the tree its example and the shared ``-v/--verbose``, ``-q/--quiet``."""
    for path, p in walk(root):
        p.formatter_class = Formatter
        example = EXAMPLES.get(path)
        if example and not p.epilog:
            lines = example.splitlines()
            p.epilog = ("examples:\n" if len(lines) > 1 else "example:\n") + "\n".join(
                textwrap.indent(line, "  ") for line in lines)
        if path and not subparsers(p):
            # a leaf: the flags may come after the command too; SUPPRESS keeps the top-level value
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging")
            p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="warnings and errors only")
