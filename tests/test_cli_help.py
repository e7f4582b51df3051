"""``--help`` is instant and complete: nothing heavy is imported, every command has a description
and a worked example whose flags parse, and ``-v``/``-q`` are accepted after any command."""
from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "ray", "timm", "open_clip", "lance", "pyarrow", "numpy", "PIL", "matplotlib"]


def _leaves():
    from vitdecomp.cli import build_parser
    from vitdecomp.cli.examples import subparsers, walk

    return [(path, p) for path, p in walk(build_parser()) if path and not subparsers(p)]


def _help_in_subprocess(argv: list[str]) -> tuple[list[str], float, str]:
    # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's peak over exec)
    code = ("import sys\nfrom vitdecomp.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('@@', [m for m in {HEAVY!r} if m in sys.modules], "
            "[int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] / 1024)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("@@"))
    loaded, mb = line[3:].rsplit(" ", 1)
    return ast.literal_eval(loaded), float(mb), r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["decompose", "--help"], ["fit", "textspan", "--help"],
                                  ["query", "ablate", "--help"], ["demo", "--help"], ["store", "check", "--help"]])
def test_help_imports_nothing_heavy_and_stays_small(argv):
    loaded, peak_mb, out = _help_in_subprocess(argv)
    assert loaded == [], f"vitdecomp {' '.join(argv)} imported {loaded}"
    assert peak_mb < 150, f"vitdecomp {' '.join(argv)} peaked at {peak_mb:.0f} MB"
    assert "usage: vitdecomp" in out


def test_every_command_has_a_description_and_an_example_that_parses():
    from vitdecomp.cli import build_parser

    leaves = _leaves()
    assert len(leaves) >= 14
    missing = [" ".join(path) for path, p in leaves if not (p.description and len(p.description) > 40)]
    assert not missing, f"commands without a one-paragraph description: {missing}"
    for path, p in leaves:
        assert p.epilog and p.epilog.startswith("example"), f"vitdecomp {' '.join(path)} has no example"
        for line in p.epilog.splitlines()[1:]:
            argv = shlex.split(line.split("  #")[0])
            assert argv[0] == "vitdecomp"
            build_parser().parse_args(argv[1:])          # exits 2 (fails the test) on an unknown flag


def test_verbose_and_quiet_are_accepted_after_any_command():
    from vitdecomp.cli import build_parser

    for path, p in _leaves():
        flags = {o for a in p._actions for o in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, path
    ns = build_parser().parse_args(["fit", "textspan", "-q"])
    assert ns.quiet is True and ns.verbose is False
    ns = build_parser().parse_args(["store", "check", "s", "--verbose"])
    assert ns.verbose is True and ns.quiet is False
    ns = build_parser().parse_args(["-v", "store", "check", "s"])
    assert ns.verbose is True                              # a top-level flag is not reset by the leaf's


def test_quiet_logging_keeps_warnings_only():
    import logging

    from vitdecomp.cli import configure_logging

    logger = logging.getLogger("vitdecomp")
    old = logger.level
    try:
        configure_logging(quiet=True)
        assert logger.getEffectiveLevel() == logging.WARNING
        configure_logging(verbose=True)
        assert logger.getEffectiveLevel() == logging.DEBUG
    finally:
        logger.setLevel(old)


def test_a_local_ray_runs_with_token_auth_set_explicitly_a_joined_cluster_keeps_its_own(monkeypatch):
    import argparse

    from vitdecomp.cli import local_ray_auth

    monkeypatch.delitem(sys.modules, "ray", raising=False)        # as in a fresh CLI process
    for env, address, want in (({}, None, "token"), ({"RAY_ADDRESS": "10.0.0.1:6379"}, None, None),
                               ({}, "ray://head:10001", None), ({"RAY_AUTH_MODE": "disabled"}, None, "disabled")):
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        local_ray_auth(argparse.Namespace(ray_address=address))
        assert os.environ.get("RAY_AUTH_MODE") == want, (env, address)
