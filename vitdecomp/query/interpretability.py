"""Interpretability scores of a model's heads from their TextSpan texts (after Madasu et al. 2024,
"Quantifying and enabling the interpretability of CLIP-like models"; implemented from the definitions
below, which are ours: the paper labels heads with a language model, we match words).

Inputs: each head's TextSpan texts ``t_{h,1..m}`` in pick order (``textspan.parquet`` of
``vitdecomp fit textspan``) and a **vocabulary** per property ``p``: a list of terms (a word or a
phrase). By default a property's terms are its descriptions (the CompAttribute properties) with the
words every one of its descriptions shares removed — ``color: [blue color, red color]`` gives the
terms ``blue`` and ``red``; a description that would be emptied stays whole. A vocabulary file
(``name: [terms…]``) replaces the terms of the properties it names and adds new ones.

Definitions, for a head ``h`` with its first ``m`` texts (``texts_per_head``, default all):

- a text **matches** property ``p`` when one of ``p``'s terms occurs in it as a whole word sequence
  (lower case, words = runs of letters and digits); a text may match several properties or none;
- ``n_{h,p}`` = how many of the ``m`` texts match ``p``;
- the head's **label** is the property with the largest ``n_{h,p}`` (ties: the one matched by the
  earliest text, then the property order); a head no text of which matches anything is unlabelled;
- the head's **association** ``a_h = n_{h,label} / m``: the share of its texts consistent with its
  label (1 = every text names the label's property);
- property ``p`` is **present** in ``h`` when ``n_{h,p} ≥ max(1, ⌈min_share · m⌉)``; a head is
  **mixed** when two or more properties are present.

Scores of the model, over its ``L`` labelled heads:

- **association score** = mean of ``a_h`` — consistency of properties *within* heads (higher is
  more interpretable);
- **entanglement score** = the fraction of labelled heads whose label is also the label of another
  labelled head — how much properties are shared *across* heads (0: every property lives in one head;
  1: every labelled head shares its property; lower is more disentangled).

Also reported: coverage (``L`` / heads) and the fraction of mixed heads. Every quantity is a count
over strings, so tests check them by hand on planted texts.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Sequence

from ..errors import InputError

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case word tokens (runs of letters and digits)."""
    return _WORD.findall(str(text).lower())


def vocabularies(properties: Mapping[str, Sequence[str]],
                 overrides: Optional[Mapping[str, Sequence[str]]] = None) -> dict[str, list[tuple[str, ...]]]:
    """``{property: [term word tuples]}``: each description without the words all of the property's
    descriptions share (module docstring); ``overrides`` replace or add properties' terms verbatim."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for name, descs in properties.items():
        if isinstance(descs, str) or not hasattr(descs, "__iter__"):
            continue                                    # embeddings given as arrays have no words
        toks = [words(d) for d in descs if isinstance(d, str)]
        if not toks:
            continue
        common = set.intersection(*(set(t) for t in toks)) if len(toks) > 1 else set()
        terms = []
        for t in toks:
            kept = tuple(w for w in t if w not in common) or tuple(t)
            if kept and kept not in terms:
                terms.append(kept)
        out[str(name)] = terms
    for name, terms in (overrides or {}).items():
        if isinstance(terms, str):
            terms = [terms]
        ts = [tuple(words(t)) for t in terms]
        ts = [t for t in ts if t]
        if not ts:
            raise InputError(f"vocabulary: property {name!r} has no usable terms ({list(terms)!r}); give words")
        out[str(name)] = list(dict.fromkeys(ts))
    if not out:
        raise InputError("no property has a vocabulary: give properties with text descriptions or a vocabulary file")
    return out


def _contains(tokens: Sequence[str], term: tuple[str, ...]) -> bool:
    n = len(term)
    return any(tuple(tokens[i:i + n]) == term for i in range(len(tokens) - n + 1))


def matches(text: str, vocab: Mapping[str, Sequence[tuple[str, ...]]]) -> list[str]:
    """The properties (in vocabulary order) one of whose terms occurs in ``text``."""
    toks = words(text)
    return [p for p, terms in vocab.items() if any(_contains(toks, t) for t in terms)]


def score_heads(texts: Mapping[str, Sequence[str]], vocab: Mapping[str, Sequence[tuple[str, ...]]],
                texts_per_head: Optional[int] = None, min_share: float = 0.2) -> tuple[list[dict], dict]:
    """Per-head labels and the model's scores.

    Args:
        texts: ``{head: [texts in TextSpan pick order]}``.
        vocab: from :func:`vocabularies`.
        texts_per_head: use the first ``m`` texts of each head (default: all of them).
        min_share: a property is present in a head from ``max(1, ⌈min_share·m⌉)`` matching texts.

    Returns ``(rows, summary)``: one row per head (``component, label, association, mixed, texts,
    matched`` and ``n_<property>`` counts; ``label`` is None for unlabelled heads) and
    ``{association_score, entanglement_score, coverage, mixed_fraction, heads, labelled, per_property}``.
    """
    if not 0.0 < min_share <= 1.0:
        raise InputError(f"min_share must be in (0, 1], got {min_share!r}")
    props = list(vocab)
    rows = []
    for head, ts in texts.items():
        ts = list(ts)[:texts_per_head] if texts_per_head else list(ts)
        m = len(ts)
        counts = {p: 0 for p in props}
        first = {}
        per_text = []
        for i, t in enumerate(ts):
            hit = matches(t, vocab)
            per_text.append(hit)
            for p in hit:
                counts[p] += 1
                first.setdefault(p, i)
        label = None
        if any(counts.values()):
            label = min(props, key=lambda p: (-counts[p], first.get(p, math.inf), props.index(p)))
        need = max(1, math.ceil(min_share * m)) if m else 1
        present = [p for p in props if counts[p] >= need]
        rows.append({"component": head, "label": label, "texts": m,
                     "association": (counts[label] / m) if label is not None and m else None,
                     "mixed": len(present) >= 2, "present": present,
                     "matched": ["|".join(h) for h in per_text],
                     **{f"n_{p}": counts[p] for p in props}})
    labelled = [r for r in rows if r["label"] is not None]
    by_label: dict[str, int] = {}
    for r in labelled:
        by_label[r["label"]] = by_label.get(r["label"], 0) + 1
    summary = {
        "heads": len(rows), "labelled": len(labelled),
        "coverage": len(labelled) / len(rows) if rows else 0.0,
        "association_score": (sum(r["association"] for r in labelled) / len(labelled)) if labelled else None,
        "entanglement_score": (sum(by_label[r["label"]] > 1 for r in labelled) / len(labelled)) if labelled else None,
        "mixed_fraction": (sum(r["mixed"] for r in labelled) / len(labelled)) if labelled else None,
        "per_property": {p: by_label.get(p, 0) for p in props},
        "texts_per_head": texts_per_head, "min_share": min_share,
    }
    return rows, summary


def texts_from_table(table) -> dict[str, list[str]]:
    """``{component: [texts in pick order]}`` from a ``textspan.parquet`` table (component, rank, text)."""
    need = {"component", "rank", "text"}
    if not need <= set(table.column_names):
        raise InputError(f"a TextSpan table needs the columns {sorted(need)}; got {table.column_names} "
                         "(make one with `vitdecomp fit textspan`)")
    out: dict[str, list[tuple[int, str]]] = {}
    for r in table.select(["component", "rank", "text"]).to_pylist():
        out.setdefault(r["component"], []).append((int(r["rank"]), r["text"]))
    return {k: [t for _, t in sorted(v)] for k, v in out.items()}


def read_textspan(path: str, s3=None):
    """The TextSpan table at ``path``: a ``textspan.parquet`` file or the fit directory holding it."""
    import pyarrow.parquet as pq

    from ..io import join, resolve

    fs, p = resolve(path, s3)
    import pyarrow.fs as pafs

    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        path = join(path, "textspan.parquet")
        fs, p = resolve(path, s3)
        info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise InputError(f"{path}: no TextSpan table (textspan.parquet); make one with `vitdecomp fit textspan "
                         "--store S --out DIR`")
    return pq.read_table(p, filesystem=fs)


def read_vocabulary(path: Optional[str], s3=None) -> Optional[dict]:
    """A YAML/JSON vocabulary file ``name: [terms…]`` (None without a path)."""
    if not path:
        return None
    import yaml

    from ..io import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path, s3).decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"vocabulary {path!r} cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"vocabulary {path!r} must map each property name to a list of terms")
    return data


def label_plot(rows: Sequence[dict], props: Sequence[str], title: str):
    """A figure: heads (rows) × properties, the number of each head's texts matching each property."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    M = np.array([[r[f"n_{p}"] for p in props] for r in rows], float).reshape(len(rows), len(props))
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(props), 1.2 + 0.22 * max(1, len(rows))))
    im = ax.imshow(M, cmap="Blues", aspect="auto", vmin=0)
    ax.set_xticks(range(len(props)), props, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"{r['component']} → {r['label'] or '—'}" for r in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="matching texts")
    fig.tight_layout()
    return fig
