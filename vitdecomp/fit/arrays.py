"""Contributions given in memory rather than as a store: an array ``[n, K, d]`` (numpy or torch) with
its component names, or a :class:`vitdecomp.engine.Decomposition`.

:func:`vitdecomp.fit.textspan.textspan` and :func:`vitdecomp.query.compattribute.compattribute` take
either a store or one of these; this module tells them apart and turns the in-memory forms into one
float64 array with its names. It imports neither torch nor pyarrow.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError

#: What the fitting and query functions accept as contributions: a :class:`vitdecomp.store.Store`, a
#: :class:`vitdecomp.engine.Decomposition`, or an array ``[n, K, d]`` (numpy or torch) with its names.
ContributionSource = Any


def is_store(obj: Any) -> bool:
    """A :class:`vitdecomp.store.Store` (or anything with its reader API: ``iter_batches`` and ``manifest``)."""
    return hasattr(obj, "iter_batches") and hasattr(obj, "manifest")


def is_decomposition(obj: Any) -> bool:
    """A :class:`vitdecomp.engine.Decomposition` (``names`` and ``contributions [B, K, d]``)."""
    return hasattr(obj, "contributions") and hasattr(obj, "names")


def to_numpy(x: Any, dtype=np.float64) -> np.ndarray:
    """A numpy array or a torch tensor (any device, with or without grad) as a numpy array of ``dtype``."""
    if hasattr(x, "detach"):                               # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def in_memory(source: Any, names: Optional[Sequence[str]] = None, what: str = "contributions"
              ) -> tuple[np.ndarray, list[str]]:
    """``(contributions [n, K, d] float64, names [K])`` of an in-memory source.

    - a Decomposition: its ``contributions`` and ``names``; ``names`` (optional) selects components;
    - an array ``[n, K, d]`` (numpy or torch): ``names`` is required and names the ``K`` components in order.
    """
    if is_decomposition(source):
        x, all_names = to_numpy(source.contributions), [str(n) for n in source.names]
        if names is None:
            return x, all_names
        from ..engine.names import select

        idx = select(all_names, list(names))
        return x[:, idx], [all_names[i] for i in idx]
    try:
        x = to_numpy(source)
    except (TypeError, ValueError):
        raise InputError(f"{what}: expected a Store, a Decomposition or an array [n, K, d], got "
                         f"{type(source).__qualname__}") from None
    if x.ndim != 3:
        raise InputError(f"{what}: an array of contributions must be [n, K, d] (images, components, dims); got "
                         f"shape {tuple(x.shape)}")
    if names is None:
        raise InputError(f"{what}: an array [n, K, d] needs names= (the {x.shape[1]} component names, in the "
                         "order of its K axis)")
    names = [str(n) for n in names]
    if len(names) != x.shape[1]:
        raise InputError(f"{what}: {len(names)} names for an array with K={x.shape[1]} components "
                         f"(shape {tuple(x.shape)}); give one name per component")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{what}: component names must be unique; repeated: {dup[:5]}")
    if not np.isfinite(x).all():
        raise InputError(f"{what}: the array holds NaN or infinite values")
    return x, names
