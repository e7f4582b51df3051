"""``vitdecomp store check | repair | vacuum``: integrity of a store (distinct ids, files present, orphans)."""
from __future__ import annotations

import argparse


def _open(args: argparse.Namespace):
    from ..store import open_store

    return open_store(args.store, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region)


def check(args: argparse.Namespace) -> int:
    from ..store.maintenance import check_store

    rep = check_store(_open(args))
    print("\n".join(rep.lines()))
    return 0 if rep.ok else 1


def repair(args: argparse.Namespace) -> int:
    from ..store.maintenance import repair_store

    rep = repair_store(_open(args), apply=args.apply)
    print("\n".join(rep.lines()))
    return 0


def vacuum(args: argparse.Namespace) -> int:
    from ..store.maintenance import vacuum_store

    rep = vacuum_store(_open(args))            # another run writing the store: StoreBusyError, exit 2
    print("\n".join(rep.lines()))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="check, repair or vacuum a store (duplicate ids, missing and orphan files)",
                       description="Check a store's integrity, or repair it: drop surplus copies of duplicated "
                                   "image ids (one copy of each is kept) and remove orphan files (written by work "
                                   "that was cut off; never read), or only vacuum: remove the orphan files.")
    ssub = p.add_subparsers(dest="store_command", required=True, metavar="what")
    for name, fn, text in (("check", check, "report ids stored twice, missing files, orphan files and the lease "
                                            "(exit 1 when something needs repairing)"),
                           ("repair", repair, "drop duplicate rows (keeping one) and remove orphan files; a dry "
                                              "run unless --apply"),
                           ("vacuum", vacuum, "remove orphan files (left by a commit that was cut off, e.g. a killed "
                                              "run; never read); refused (exit 2) while another run writes the "
                                              "store")):
        q = ssub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument("store", help="the store: a local directory or s3://bucket/prefix")
        q.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3 / "
                                             "$AWS_ENDPOINT_URL)")
        q.add_argument("--s3-region", help="S3 region (default: $AWS_REGION)")
        if name == "repair":
            q.add_argument("--apply", action="store_true",
                           help="change the store (default: a dry run that only reports what it would do)")
        q.set_defaults(func=fn)
