"""The ``vitdecomp`` command line: ``vitdecomp <command> --help`` explains every option.

``jobs/<command>.py`` are thin wrappers around the same entry points, so that
``python jobs/decompose.py ...`` and ``ray job submit -- python jobs/decompose.py ...`` work from a
checkout.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, benchmark, decompose_job, demo, fit_job, query_job

    p = argparse.ArgumentParser(prog="vitdecomp", description="Exact per-component decomposition of vision models "
                                "over whole datasets: decompose, fit, query.")
    p.add_argument("--version", action="version", version=f"vitdecomp {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    demo.add_parser(sub)
    decompose_job.add_parser(sub)
    fit_job.add_parser(sub)
    query_job.add_parser(sub)
    benchmark.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import VitdecompError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitdecomp").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        rc = args.func(args)
    except VitdecompError as e:
        print(f"vitdecomp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


def run_job(command: str) -> None:
    """Entry point of ``jobs/<command>.py``: ``python jobs/<command>.py [options]``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
