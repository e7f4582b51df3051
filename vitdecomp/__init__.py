"""vitdecomp: exact per-component decomposition of vision-model representations over whole datasets.

The packages follow the pipeline::

    vitdecomp.models     load_model("timm:…" | "open_clip:…")      vitdecomp.io      local / s3:// I/O
    vitdecomp.engine     decompose(model, images) → Decomposition   vitdecomp.config  frozen job configs
    vitdecomp.store      Store: one row per image, one column per component (Lance or Parquet)
    vitdecomp.pipeline   run_decompose: a corpus through a Ray Data actor pool into a store
    vitdecomp.fit        CompAlign, TextSpan, linear probes
    vitdecomp.query      CompAttribute, retrieval, ablation, mitigation, heatmaps, report
    vitdecomp.toyworld   the built-in world with planted truth, its tiny models and the demo
    vitdecomp.cli        the ``vitdecomp`` command (the only place that parses flags or prints)

Attributes are imported on first use, so ``import vitdecomp.engine`` loads neither Ray, Lance nor
pyarrow, and ``vitdecomp --help`` loads neither torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import InputError, UnknownModelError, UnsupportedModuleError, VitdecompError
from .version import __version__

_LAZY = {
    "Component": "vitdecomp.engine.names", "Decomposition": "vitdecomp.engine", "components_for": "vitdecomp.engine",
    "decompose": "vitdecomp.engine", "register_rule": "vitdecomp.engine",
    "LoadedModel": "vitdecomp.models", "load_model": "vitdecomp.models", "supported_models": "vitdecomp.models",
    "Store": "vitdecomp.store", "open_store": "vitdecomp.store",
}
_SUBPACKAGES = ("config", "engine", "fit", "io", "models", "pipeline", "query", "store", "toyworld")

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Component, Decomposition, components_for, decompose, register_rule  # noqa: F401
    from .models import LoadedModel, load_model, supported_models  # noqa: F401
    from .store import Store, open_store  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"vitdecomp.{name}")
    else:
        raise AttributeError(f"module 'vitdecomp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])


__all__ = ["Component", "Decomposition", "InputError", "LoadedModel", "Store", "UnknownModelError",
           "UnsupportedModuleError", "VitdecompError", "__version__", "components_for", "decompose", "load_model",
           "open_store", "register_rule", "supported_models"]
