"""The ``vitdecomp`` command line: ``vitdecomp <command> --help`` explains every option.

One module per command (:mod:`.decompose`, :mod:`.fit`, :mod:`.query`, :mod:`.demo`,
:mod:`.benchmark`): flags → a frozen config (:mod:`vitdecomp.config`) → one library call → the
result printed. Only this package parses flags or prints. ``jobs/<command>.py`` are thin wrappers
around the same entry points, so ``python jobs/decompose.py ...`` and ``ray job submit -- python
jobs/decompose.py ...`` work from a checkout. Building the parser imports no torch or Ray.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__
    from . import benchmark, decompose, demo, fit, query, reproduce, serve, store
    from .examples import Formatter, finish

    p = argparse.ArgumentParser(prog="vitdecomp", formatter_class=Formatter, description="Exact per-component decomposition of vision models "
                                "over whole datasets: decompose, fit, query.")
    p.add_argument("--version", action="version", version=f"vitdecomp {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    demo.add_parser(sub)
    decompose.add_parser(sub)
    fit.add_parser(sub)
    query.add_parser(sub)
    store.add_parser(sub)
    serve.add_parser(sub)
    benchmark.add_parser(sub)
    reproduce.add_parser(sub)
    finish(p)
    return p


def error_line(command: str, e: Exception) -> str:
    """One line for a user error: what, where and how to fix (an option named as its flag)."""
    from ..config import OptionError
    from .options import flag

    if isinstance(e, OptionError):
        return f"vitdecomp {command}: error: {flag(e.option)}: {e.message}"
    return f"vitdecomp {command}: error: {e}"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """``-v``: vitdecomp at DEBUG; ``-q``: warnings and errors only; default: vitdecomp at INFO.
    Ray's workers follow through ``RAY_LOGGING_LEVEL`` (set before Ray starts)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("vitdecomp").setLevel(level)
    if quiet:
        os.environ.setdefault("RAY_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def local_ray_auth(args: argparse.Namespace) -> None:
    """A Ray cluster this command starts itself (no ``--ray-address`` or ``RAY_ADDRESS``) runs with Ray's
    token authentication, set explicitly with Ray's own ``RAY_AUTH_MODE`` before Ray is imported (Ray
    prints a notice on every start while the mode is implicit). A cluster the command joins keeps its
    own setting; a ``RAY_AUTH_MODE`` already in the environment wins."""
    if getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS") or "ray" in sys.modules:
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..errors import VitdecompError

    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    command = " ".join(x for x in (args.command, getattr(args, "fit", None), getattr(args, "query", None),
                                   getattr(args, "benchmark", None), getattr(args, "store_command", None),
                                   getattr(args, "reproduce", None)) if x)
    if args.command in ("decompose", "fit", "query", "demo", "benchmark", "serve", "reproduce"):
        local_ray_auth(args)
        import importlib

        importlib.import_module("vitdecomp.toyworld")      # the built-in world's model names (demo stores)
    try:
        rc = args.func(args)
    except VitdecompError as e:
        print(error_line(command, e), file=sys.stderr)
        return 2
    return int(rc or 0)


def run_job(command: str) -> None:
    """Entry point of ``jobs/<command>.py``: ``python jobs/<command>.py [options]``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
