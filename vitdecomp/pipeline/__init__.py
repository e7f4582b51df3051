"""The decompose pipeline: sources → decode → decomposer (a Ray Data actor pool) → write → commits.

:func:`run_decompose` runs it on a local Ray instance or a cluster; each stage is a plain function or
callable class that tests call without Ray.
"""
from .job import Summary, run_decompose

__all__ = ["Summary", "run_decompose"]
