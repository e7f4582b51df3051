"""Row selections of a store: by a split column, or by a deterministic hash of the image id."""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from ..config import OptionError
from ..errors import InputError


def in_validation(image_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the id (stable across runs, machines and store orders)."""
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def check_column(st, column: Optional[str], option: str) -> None:
    """``column`` must be a column of the store (``option`` names the option that gave it)."""
    if not column:
        raise OptionError(option, "is required")
    names = st.schema().names
    if column not in names:
        extra = [c for c in names if c not in ("image_id", "readout", "teacher") and not c.startswith("c_")]
        raise OptionError(option, f"{column!r} is not a column of {st.uri}; its pass-through columns are {extra} "
                                  "(decompose from a table input to carry labels and groups into the store)")


def select_ids(st, split_column: Optional[str], values: Optional[Sequence[str]], *, fraction: float = 0.5,
               holdout: bool = False) -> list[str]:
    """Ids of the rows whose ``split_column`` is one of ``values``; without a split column, a
    deterministic hash split of the ids (``holdout=False``: the validation part, of ``fraction``)."""
    if split_column:
        check_column(st, split_column, "split_column")
        t = st.read(columns=["image_id", split_column])
        want = {str(v) for v in (values or [])}
        ids = [i for i, v in zip(t.column("image_id").to_pylist(), t.column(split_column).to_pylist())
               if str(v) in want]
        if not ids:
            have = sorted({str(v) for v in t.column(split_column).to_pylist()})
            raise InputError(f"no rows of {st.uri} have {split_column} in {sorted(want)}; its values are {have[:20]}")
        return ids
    return [i for i in st.ids() if in_validation(i, fraction) != holdout]
