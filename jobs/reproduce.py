"""`python jobs/reproduce.py <experiment> --help` — same as `vitdecomp reproduce`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vitdecomp.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("reproduce")
