"""The store's manifest: what was decomposed and how.

:class:`Manifest` is the typed, frozen form of ``manifest.json``; ``Manifest.from_json(text).to_json()``
reproduces the file the store wrote byte for byte (``json.dumps(..., indent=2, sort_keys=True)``).
:meth:`Manifest.build` makes one from a loaded model and decompose options — the decompose job and the
in-process :meth:`vitdecomp.store.Store.create` use the same builder. ``Store.manifest`` stays the plain
dict (``st.manifest["model"]["name"]``); ``Store.typed_manifest`` is the :class:`Manifest`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import pyarrow as pa

from ..engine.names import Component
from ..errors import InputError, VitdecompError
from .schema import column_for, contributions_schema

if TYPE_CHECKING:  # pragma: no cover
    from ..models import LoadedModel

MANIFEST = "manifest.json"
# store layouts (README “Store layout”; the compact layout's code is in vitdecomp.store.compact)
LAYOUTS = ("compact", "full")
FORMAT_VERSION = 2                 # stores this reader understands: 1 (full, no field), 2 (compact)
MIN_READER = "0.1.0"               # first vitdecomp version that reads format 2 (the compact layout)


class LayoutError(VitdecompError):
    """A store whose layout this reader cannot use, or whose basis file does not match its manifest."""


def check_reader(manifest: Mapping[str, Any], where: str) -> None:
    """Refuse a manifest written in a layout or format this version does not know (before reading rows)."""
    from ..version import __version__

    layout = manifest.get("layout", "full")
    version = manifest.get("format_version", 1)
    if layout not in LAYOUTS or not isinstance(version, int) or version > FORMAT_VERSION:
        need = manifest.get("min_reader", "a newer release")
        raise LayoutError(f"{where}: store layout {layout} (format {version}) needs vitdecomp ≥ {need}; this is "
                          f"vitdecomp {__version__}, which reads layouts {list(LAYOUTS)} up to format "
                          f"{FORMAT_VERSION}: upgrade vitdecomp to read this store")
# manifest fields that must agree before appending to an existing store
IDENTITY_FIELDS = ("format", "model", "teacher", "preprocess", "teacher_preprocess", "options", "components", "dtype",
                   "passthrough")


def components_to_json(components: Sequence[Component]) -> list[dict]:
    return [{"name": c.name, "column": column_for(c.name), "kind": c.kind, "path": c.path, "block": c.block,
             "head": c.head} for c in components]


def components_from_json(items: Sequence[dict]) -> list[Component]:
    return [Component(i["name"], i["kind"], i["path"], i["block"], i["head"]) for i in items]


def _as_dict(manifest: Union["Manifest", Mapping[str, Any]]) -> Mapping[str, Any]:
    return manifest.to_dict() if isinstance(manifest, Manifest) else manifest


def manifest_diff(a: Union["Manifest", Mapping[str, Any]], b: Union["Manifest", Mapping[str, Any]]) -> list[str]:
    """Identity fields on which two manifests (:class:`Manifest` or its dict) disagree."""
    a, b = _as_dict(a), _as_dict(b)
    return [k for k in IDENTITY_FIELDS if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def manifest_hash(manifest: Union["Manifest", Mapping[str, Any]]) -> str:
    """SHA-256 of a manifest's identity fields (what an aligner or probe was fitted on)."""
    manifest = _as_dict(manifest)
    ident = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------ typed manifest
_FORMATS = ("lance", "parquet")


class _FromModel:
    """Default of :meth:`Manifest.build`'s weight arguments: take the value from the loaded model."""

    def __repr__(self) -> str:
        return "FROM_MODEL"


FROM_MODEL: Any = _FromModel()


def _extra(d: Mapping[str, Any], known: Iterable[str]) -> dict:
    """The keys of ``d`` this version does not know (kept, so that a newer manifest round-trips)."""
    known = set(known)
    return {k: copy.deepcopy(v) for k, v in d.items() if k not in known}


@dataclass(frozen=True)
class ModelInfo:
    """``manifest["model"]`` (the decomposed model) or ``manifest["teacher"]``.

    ``pretrained``: weights tag (None: random init or a checkpoint); ``checkpoint``: the weights
    file's name (no folders) and ``checkpoint_sha256`` its digest; ``seed``: random init only (the
    weights are those of this seed; absent otherwise). ``readout`` (model only) is
    ``{"kind", "pool", "dim", "space"}``; ``dim`` (teacher only) the teacher embedding's size.
    """

    name: str
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    seed: Optional[int] = None
    readout: Optional[dict] = None
    dim: Optional[int] = None
    extra: dict = field(default_factory=dict)

    _ALWAYS = ("name", "pretrained", "checkpoint", "checkpoint_sha256")
    _OPTIONAL = ("seed", "readout", "dim")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self._ALWAYS}
        out.update({k: copy.deepcopy(getattr(self, k)) for k in self._OPTIONAL if getattr(self, k) is not None})
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelInfo":
        keys = (*cls._ALWAYS, *cls._OPTIONAL)
        return cls(**{k: copy.deepcopy(d.get(k)) for k in keys}, extra=_extra(d, keys))

    @classmethod
    def of(cls, lm: "LoadedModel", *, pretrained: Optional[str] = FROM_MODEL, checkpoint: Optional[str] = FROM_MODEL,
           seed: int = 0, teacher: bool = False) -> "ModelInfo":
        """The record of a loaded model, as the decompose job writes it (``pretrained``/``checkpoint``
        default to the model's own; the seed is recorded only for random-init weights)."""
        pretrained = lm.pretrained if pretrained is FROM_MODEL else pretrained
        checkpoint = lm.checkpoint if checkpoint is FROM_MODEL else checkpoint
        random_init = not (pretrained or checkpoint)
        return cls(name=lm.name, pretrained=pretrained or None,
                   checkpoint=os.path.basename(checkpoint) if checkpoint else None,
                   checkpoint_sha256=lm.checkpoint_sha256 if checkpoint else None,
                   seed=int(seed) if random_init else None,
                   readout=None if teacher else dataclasses.asdict(lm.readout),
                   dim=int(lm.readout.dim) if teacher else None)


@dataclass(frozen=True)
class ManifestOptions:
    """``manifest["options"]``: how the model was decomposed (``blocks`` None = all)."""

    blocks: Optional[tuple[int, ...]] = None
    heads: bool = True
    convention: str = "centered"
    normalize: bool = False
    readout_only: bool = False
    extra: dict = field(default_factory=dict)

    _KEYS = ("blocks", "heads", "convention", "normalize", "readout_only")

    def __post_init__(self):
        if self.blocks is not None and not isinstance(self.blocks, tuple):
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def to_dict(self) -> dict:
        return {"blocks": None if self.blocks is None else list(self.blocks), "heads": self.heads,
                "convention": self.convention, "normalize": self.normalize, "readout_only": self.readout_only,
                **copy.deepcopy(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ManifestOptions":
        return cls(**{k: d[k] for k in cls._KEYS if k in d}, extra=_extra(d, cls._KEYS))


@dataclass(frozen=True)
class Manifest:
    """What a store holds and how it was made (``manifest.json``), typed and frozen.

    ``components`` are ordered as the store's component columns (``column_for(name)``); ``d`` is the
    size of every vector column but ``teacher``; ``dtype`` (``"fp16"``/``"fp32"``) their element type;
    ``passthrough`` the pass-through columns as ``"name:type"`` strings. ``source``, ``package`` and
    ``created`` are provenance (None: absent, as in stores made before they were recorded); ``extra``
    keeps unknown top-level keys. ``passthrough_schema`` (not serialised, not compared) is the Arrow
    schema of the pass-through columns when it is known exactly (a manifest from :meth:`build`).

    Dict fields are copies owned by the manifest: treat them as read-only.
    """

    format: str
    model: ModelInfo
    preprocess: dict
    options: ManifestOptions
    components: tuple[Component, ...]
    d: int
    dtype: str
    teacher: Optional[ModelInfo] = None
    teacher_preprocess: Optional[dict] = None
    passthrough: Optional[tuple[str, ...]] = None
    source: Optional[dict] = None
    package: Optional[dict] = None
    created: Optional[str] = None
    extra: dict = field(default_factory=dict)
    passthrough_schema: Optional[pa.Schema] = field(default=None, compare=False, repr=False)

    _KEYS = ("format", "model", "teacher", "preprocess", "teacher_preprocess", "options", "components", "d", "dtype",
             "passthrough", "source", "package", "created")
    _OPTIONAL = ("source", "package", "created")      # omitted when None (older stores lack them)

    def __post_init__(self):
        from .schema import DTYPES

        if not isinstance(self.components, tuple):
            object.__setattr__(self, "components", tuple(self.components))
        if self.passthrough is not None and not isinstance(self.passthrough, tuple):
            object.__setattr__(self, "passthrough", tuple(self.passthrough))
        if self.format not in _FORMATS:
            raise InputError(f"manifest format must be one of {list(_FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"manifest dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.d, int) or isinstance(self.d, bool) or self.d <= 0:
            raise InputError(f"manifest d must be a positive int, got {self.d!r}")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise InputError(f"manifest components repeat names: {sorted({n for n in names if names.count(n) > 1})}")

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        """Component names, in column order."""
        return [c.name for c in self.components]

    @property
    def teacher_dim(self) -> Optional[int]:
        return self.teacher.dim if self.teacher is not None else None

    @property
    def layout(self) -> str:
        """``"full"`` (one ``d``-vector per component) or ``"compact"`` (README “Store layout”)."""
        return self.extra.get("layout", "full")

    @property
    def compact(self) -> dict:
        """The compact layout's entry (basis file, SHA-256, per component rank and offset weight); {} if full."""
        return copy.deepcopy(self.extra.get("compact") or {}) if self.layout == "compact" else {}

    def widths(self) -> dict[str, int]:
        """Component name → numbers stored per image (the basis rank for compact components)."""
        return {n: int(v["rank"]) for n, v in self.compact.get("components", {}).items()}

    def schema(self, passthrough: Optional[pa.Schema] = None) -> pa.Schema:
        """The contributions table's Arrow schema (``contributions_schema``). The pass-through columns'
        types come from ``passthrough``, else :attr:`passthrough_schema`, else the ``"name:type"``
        strings when they name plain Arrow types (``string``, ``int64``, ``double``, …)."""
        if passthrough is None:
            passthrough = self.passthrough_schema
        if passthrough is None:
            passthrough = _parse_passthrough(self.passthrough or ())
        return contributions_schema(list(self.components), self.d, self.dtype, passthrough, self.teacher_dim,
                                    widths=self.widths(), offset=bool(self.compact.get("offset_column")))

    def __getitem__(self, key: str) -> Any:
        """``m["model"]["name"]``: the JSON value of a top-level key (a copy)."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __hash__(self) -> int:
        return hash(self.to_json())

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The manifest as the JSON object stored in ``manifest.json`` (fresh copies)."""
        out = {
            "format": self.format,
            "model": self.model.to_dict(),
            "teacher": None if self.teacher is None else self.teacher.to_dict(),
            "preprocess": copy.deepcopy(self.preprocess),
            "teacher_preprocess": copy.deepcopy(self.teacher_preprocess),
            "options": self.options.to_dict(),
            "components": components_to_json(self.components),
            "d": self.d,
            "dtype": self.dtype,
            "passthrough": None if self.passthrough is None else list(self.passthrough),
        }
        out.update({k: copy.deepcopy(getattr(self, k)) for k in self._OPTIONAL if getattr(self, k) is not None})
        out.update(copy.deepcopy(self.extra))
        return out

    def to_json(self) -> str:
        """Exactly the text the store writes as ``manifest.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """A manifest from its JSON object (any store's ``manifest.json``; unknown keys are kept)."""
        missing = [k for k in ("format", "model", "components", "d", "dtype") if k not in d]
        if missing:
            raise InputError(f"not a store manifest: it lacks {missing} (keys: {sorted(d)})")
        check_reader(d, "manifest")
        return cls(format=d["format"], model=ModelInfo.from_dict(d["model"]),
                   teacher=None if d.get("teacher") is None else ModelInfo.from_dict(d["teacher"]),
                   preprocess=copy.deepcopy(d.get("preprocess")),
                   teacher_preprocess=copy.deepcopy(d.get("teacher_preprocess")),
                   options=ManifestOptions.from_dict(d.get("options") or {}),
                   components=tuple(components_from_json(d["components"])), d=d["d"], dtype=d["dtype"],
                   passthrough=None if d.get("passthrough") is None else tuple(d["passthrough"]),
                   **{k: copy.deepcopy(d.get(k)) for k in cls._OPTIONAL}, extra=_extra(d, cls._KEYS))

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "Manifest":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ builder
    @classmethod
    def build(cls, model: "LoadedModel", components: Optional[Sequence[Component]] = None, options: Any = None, *,
              format: str = "lance", teacher: Optional["LoadedModel"] = None,
              passthrough: Union[pa.Schema, Iterable[pa.Field], Mapping[str, pa.DataType]] = (),
              source_kind: str = "api", seed: int = 0, readout_only: bool = False,
              pretrained: Optional[str] = FROM_MODEL, checkpoint: Optional[str] = FROM_MODEL,
              teacher_pretrained: Optional[str] = FROM_MODEL, teacher_checkpoint: Optional[str] = FROM_MODEL,
              created: Optional[str] = None, layout_fields: Optional[Mapping[str, Any]] = None) -> "Manifest":
        """The manifest of a store of ``model``'s contributions (what the decompose job records).

        Args:
            model: the decomposed model (:func:`vitdecomp.load_model`; weights need not be loaded).
            components: the stored components, in column order; None: ``components_for(model)`` with
                the options' blocks and heads. An explicit list is recorded as given (planted stores).
            options: blocks / heads / convention / normalize / dtype (a
                :class:`vitdecomp.config.DecomposeOptions` or anything with those attributes);
                None: ``DecomposeOptions()``.
            format: ``"lance"`` or ``"parquet"``.
            teacher: an open_clip model whose normalised image embedding is stored as ``teacher``.
            passthrough: the pass-through columns (Arrow schema, fields, or name → type).
            source_kind: where the images came from (``folder``/``table``/``webdataset``/``api``).
            seed: recorded for random-init weights (the seed ``load_model`` built them from).
            readout_only: store the readout only (no component columns).
            pretrained, checkpoint, teacher_pretrained, teacher_checkpoint: the weights as asked for
                (default: the loaded model's own ``pretrained``/``checkpoint``).
            created: UTC time stamp (default: now).
            layout_fields: the compact layout's manifest fields
                (:meth:`vitdecomp.store.compact.CompactLayout.manifest_fields`); None: the full layout.
        """
        from ..config import DecomposeOptions, parse_blocks
        from ..models import extension_modules
        from ..version import __version__

        options = DecomposeOptions() if options is None else options
        blocks = parse_blocks(getattr(options, "blocks", None))
        heads = bool(getattr(options, "heads", True))
        if components is None:
            from ..engine import components_for

            components = components_for(model, blocks=blocks, heads=heads)
        if isinstance(passthrough, Mapping):
            passthrough = pa.schema([pa.field(k, v) for k, v in passthrough.items()])
        elif not isinstance(passthrough, pa.Schema):
            passthrough = pa.schema(list(passthrough))
        if format not in _FORMATS:
            raise InputError(f"format must be one of {list(_FORMATS)}, got {format!r}")
        return cls(
            format=format,
            model=ModelInfo.of(model, pretrained=pretrained, checkpoint=checkpoint, seed=seed),
            teacher=None if teacher is None else ModelInfo.of(teacher, pretrained=teacher_pretrained,
                                                              checkpoint=teacher_checkpoint, seed=seed, teacher=True),
            preprocess=copy.deepcopy(model.preprocess),
            teacher_preprocess=copy.deepcopy(teacher.preprocess) if teacher is not None else None,
            options=ManifestOptions(blocks=None if blocks is None else tuple(blocks), heads=heads,
                                    convention=getattr(options, "convention", "centered"),
                                    normalize=bool(getattr(options, "normalize", False)), readout_only=readout_only),
            components=() if readout_only else tuple(components),
            d=int(model.readout.dim),
            dtype=getattr(options, "dtype", "fp16"),
            passthrough=tuple(f"{f.name}:{f.type}" for f in passthrough),
            source={"kind": source_kind},
            package={"vitdecomp": __version__, **({"extensions": list(extension_modules())}
                                                  if extension_modules() else {})},
            created=created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            passthrough_schema=passthrough,
            extra=copy.deepcopy(dict(layout_fields or {})),
        )


def _parse_passthrough(items: Sequence[str]) -> pa.Schema:
    """``["label:string", …]`` → Arrow schema (plain types only; see :meth:`Manifest.schema`)."""
    fields = []
    for item in items:
        name, sep, typ = item.partition(":")
        try:
            if not sep:
                raise ValueError("no type recorded")
            fields.append(pa.field(name, pa.type_for_alias(typ)))
        except (ValueError, KeyError) as e:
            raise InputError(f"the pass-through column {item!r} of the manifest does not name a plain Arrow type "
                             f"({e}); pass the store schema explicitly") from None
    return pa.schema(fields)
