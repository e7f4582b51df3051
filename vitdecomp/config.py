"""Typed, frozen job configurations and the option groups they share.

Every job takes one frozen dataclass. Option groups (:class:`S3Options`, :class:`StoreOptions`,
:class:`OutputOptions`, :class:`TextModelOptions`, :class:`DecomposeOptions`, :class:`AlignConfig`)
are composed into the job configs by inheritance, so a function that needs, say, the text-model
options accepts any job config that has them.

Values are normalised to their declared types on construction (``"0.5"`` → ``0.5`` for a
``float``; a YAML ``1`` → ``1.0``; a JSON string → a ``dict``), then checked; a bad value raises
:class:`OptionError` naming the option and the value. The CLI (:mod:`vitdecomp.cli`) builds its
flags from the same type hints, so flags and config files arrive with the same types.

This module imports nothing heavy (no torch, Ray or pyarrow): ``--help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Optional, Union

from .errors import InputError

DEFAULT_TEXT_CACHE = os.path.join("~", ".cache", "vitdecomp", "text")


class OptionError(InputError):
    """A bad option value; ``option`` is the field name (the CLI shows it as ``--option-name``)."""

    def __init__(self, option: str, message: str):
        self.option = option
        self.message = message
        super().__init__(f"{option}: {message}")


# ------------------------------------------------------------------------------------ types
_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of a config class (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``Optional[X]`` → ``(X, True)``; anything else → ``(hint, False)``."""
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def choices_of(hint: Any) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` hint (inside ``Optional`` too), else None."""
    base, _ = unwrap_optional(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` (a flag string, a YAML/JSON value or a Python value) as type ``hint``."""
    base, optional = unwrap_optional(hint)
    if optional and isinstance(value, str) and value == "" and base is not str:
        value = None                                 # an empty flag or YAML value: not given
    if value is None:
        if optional:
            return None
        raise OptionError(name, "a value is required")
    origin = typing.get_origin(base)
    if origin is Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise OptionError(name, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise OptionError(name, f"expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise OptionError(name, f"expected a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise OptionError(name, f"expected a whole number, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise OptionError(name, f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise OptionError(name, f"expected a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise OptionError(name, f"expected a finite number, got {value!r}")
        return out
    if base is str:
        if isinstance(value, (dict, list, tuple)):
            raise OptionError(name, f"expected a single value, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise OptionError(name, f"expected a list of values, got {value!r}")
        return [coerce(v, item, name) for v in value]
    if origin is dict or base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise OptionError(name, f"{value!r} is not a JSON object ({e.msg}); use e.g. '{{\"name\": 1}}'") from None
        if not isinstance(value, dict):
            raise OptionError(name, f"expected a mapping, got {value!r}")
        args = typing.get_args(base)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): (v if vt is Any else coerce(v, vt, f"{name}.{k}")) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------ base
@dataclass(frozen=True)
class Config:
    """Base of every config: typed on construction, immutable, JSON round trip."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Range and consistency checks; subclasses extend (call ``super().validate()``)."""

    def check_required(self) -> None:
        """Every option in ``REQUIRED`` is set (called by jobs, so partial configs can be built)."""
        for name in self.REQUIRED:
            if getattr(self, name) in (None, "", []):
                raise OptionError(name, "is required (a flag or a config-file key)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "Config":
        """From a mapping whose keys are option names (``-`` or ``_``); unknown keys fail with close matches."""
        known = {f.name for f in fields(cls)}
        out = {}
        for k, v in values.items():
            key = str(k).replace("-", "_")
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, sorted(known), n=3)
                raise OptionError(key, f"unknown option in {where}" + (f"; did you mean {close}?" if close else ""))
            out[key] = v
        return cls(**out)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def positive(cfg: Config, *names: str, allow_none: bool = True) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is None and allow_none:
            continue
        if v is None or v < 1:
            raise OptionError(n, f"must be a positive whole number, got {v!r}")


def local_file(cfg: Config, name: str, kind: str = "text") -> None:
    """A file option that names a local path must exist, be readable and (``kind="yaml"``) parse to a
    non-empty mapping; ``s3://`` paths are checked when they are read."""
    path = getattr(cfg, name)
    if not path or str(path).startswith("s3://"):
        return
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise OptionError(name, f"{path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(name, f"{path!r} cannot be read: {e}") from None
    if kind == "yaml":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise OptionError(name, f"{path!r} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not data:
            raise OptionError(name, f"{path!r} must map each property name to a non-empty list of descriptions")
    elif not text.strip():
        raise OptionError(name, f"{path!r} is empty (it needs one entry per line)")


def fraction(cfg: Config, name: str) -> None:
    v = getattr(cfg, name)
    if not 0.0 < v < 1.0:
        raise OptionError(name, f"must be a fraction strictly between 0 and 1, got {v!r}")


def parse_blocks(spec: Optional[str]) -> Optional[list[int]]:
    """``"7-11"``, ``"7,8,9,10,11"``, ``"-4:"`` (last four) or None (all)."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, (list, tuple)):
        return [int(b) for b in spec]
    s = str(spec).strip()
    try:
        if s.endswith(":"):
            return list(range(int(s[:-1]), 0))
        if "-" in s[1:]:
            lo, hi = s.split("-", 1) if not s.startswith("-") else ("-" + s[1:].split("-", 1)[0], s[1:].split("-", 1)[1])
            return list(range(int(lo), int(hi) + 1))
        return [int(b) for b in s.split(",")]
    except ValueError:
        raise OptionError("blocks", f"{spec!r}: use e.g. '7-11', '7,8,9,10,11' or '-4:' (the last four)") from None


# ------------------------------------------------------------------------------- option groups
@dataclass(frozen=True)
class S3Options(Config):
    """How to reach S3 or an S3-compatible store (credentials come from the AWS environment only)."""

    s3_endpoint: Optional[str] = None
    s3_region: Optional[str] = None

    def s3(self):
        from .io import S3Settings

        return S3Settings.from_env(self.s3_endpoint, self.s3_region)


@dataclass(frozen=True)
class StoreOptions(S3Options):
    """A store to read (local path or ``s3://``)."""

    store: str = ""


@dataclass(frozen=True)
class OutputOptions(Config):
    """Where a job writes its tables, plots and report (local directory or ``s3://``)."""

    out: str = ""


@dataclass(frozen=True)
class TextModelOptions(Config):
    """The open_clip model whose text tower shares the contributions' CLIP space."""

    clip: Optional[str] = None
    clip_pretrained: Optional[str] = None
    clip_checkpoint: Optional[str] = None
    cache_dir: Optional[str] = None

    @property
    def text_cache(self) -> str:
        return os.path.expanduser(self.cache_dir or DEFAULT_TEXT_CACHE)


@dataclass(frozen=True)
class DecomposeOptions(Config):
    """What is decomposed and how (recorded in the store's manifest)."""

    blocks: Optional[str] = None
    heads: bool = True
    convention: Literal["centered", "uniform"] = "centered"
    normalize: bool = False
    dtype: Literal["fp16", "fp32"] = "fp16"
    layout: Literal["compact", "full"] = "compact"   # README “Store layout”; an existing store keeps its own

    def validate(self) -> None:
        super().validate()
        parse_blocks(self.blocks)


@dataclass(frozen=True)
class AlignConfig(Config):
    """CompAlign training (README “Fit CompAlign and TextSpan”)."""

    lam: float = 1.0
    lr: float = 3e-4
    weight_decay: float = 1e-6
    batch_size: int = 32
    max_epochs: int = 20
    patience: int = 3
    min_delta: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        positive(self, "batch_size", "max_epochs", "patience")
        fraction(self, "val_fraction")
        for n in ("lam", "weight_decay", "min_delta"):
            if getattr(self, n) < 0:
                raise OptionError(n, f"must not be negative, got {getattr(self, n)!r}")
        for n in ("lr", "init_std"):
            if getattr(self, n) <= 0:
                raise OptionError(n, f"must be positive, got {getattr(self, n)!r}")


# --------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class DecomposeConfig(DecomposeOptions, S3Options):
    """``vitdecomp decompose``: image corpus → contribution store."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("input", "output", "model")

    input: str = ""
    output: str = ""
    model: str = ""
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    format: Literal["lance", "parquet"] = "lance"
    source: Literal["auto", "folder", "table", "webdataset"] = "auto"
    batch_size: int = 32
    concurrency: int = 1
    teacher: Optional[str] = None
    teacher_pretrained: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    label_from_folder: bool = False
    id_column: Optional[str] = None
    uri_column: Optional[str] = None
    bytes_column: Optional[str] = None
    columns: Optional[list[str]] = None
    commit_every: int = 512
    limit: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None
    worker_resources: Optional[dict[str, float]] = None   # custom Ray resources per model actor
    decode_resources: Optional[dict[str, float]] = None   # custom Ray resources per decode task
    readout_only: bool = False         # benchmark baseline: same pipeline, readout column only
    seed: int = 0                      # random-init models (no weights) are built from this seed
    max_pixels: Optional[int] = None   # images declaring more pixels are refused (None: Pillow's default limit)
    alpha_background: str = "white"    # colour transparent pixels are composited on (name or '#rrggbb')
    dedupe_ids: bool = False           # table input: keep the first row of each duplicate id (else refuse)
    isolate_decoding: bool = True      # decode in a child process: an input that crashes the decoder is an error row

    def validate(self) -> None:
        super().validate()
        positive(self, "batch_size", "concurrency", "commit_every", "limit", "num_cpus", "max_pixels")
        from PIL import ImageColor

        try:
            ImageColor.getrgb(self.alpha_background.strip())
        except ValueError:
            raise OptionError("alpha_background", f"unknown colour {self.alpha_background!r}: use a colour name "
                                                  "such as 'white' or '#rrggbb'") from None
        if self.pretrained and self.checkpoint:
            raise OptionError("checkpoint", "pass either pretrained weights or a checkpoint, not both")
        for name in ("worker_resources", "decode_resources"):
            for k, v in (getattr(self, name) or {}).items():
                if k in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise OptionError(name, f"{k!r} is not a custom resource; CPUs and GPUs follow the "
                                            "concurrency and device options")
                if v <= 0:
                    raise OptionError(name, f"the amount of {k!r} must be positive, got {v!r}")


@dataclass(frozen=True)
class CompAlignConfig(AlignConfig, OutputOptions, StoreOptions):
    """``vitdecomp fit compalign``: per-component maps into the teacher's CLIP space."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out")


@dataclass(frozen=True)
class TextSpanConfig(TextModelOptions, OutputOptions, StoreOptions):
    """``vitdecomp fit textspan``: a text basis per head, exact from streamed moments."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out")

    pool: Optional[str] = None
    components: Optional[list[str]] = None
    last_layers: int = 4
    texts_per_head: int = 10
    rank: int = 80
    aligner: Optional[str] = None
    distributed: bool = True
    label_column: Optional[str] = None
    class_names: Optional[list[str]] = None

    def validate(self) -> None:
        super().validate()
        positive(self, "last_layers", "texts_per_head", "rank")
        local_file(self, "pool")


@dataclass(frozen=True)
class ProbeConfig(OutputOptions, StoreOptions):
    """``vitdecomp fit probe``: a linear probe on the stored readouts."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out", "label_column")

    label_column: str = ""
    class_names: Optional[list[str]] = None
    split_column: Optional[str] = None
    fit_split: Optional[list[str]] = None
    l2: float = 1e-3
    max_rows: int = 200_000

    def validate(self) -> None:
        super().validate()
        positive(self, "max_rows")
        if self.l2 < 0:
            raise OptionError("l2", f"must not be negative, got {self.l2!r}")


@dataclass(frozen=True)
class CompAttributeConfig(TextModelOptions, OutputOptions, StoreOptions):
    """``vitdecomp query compattribute``: every component against every property."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out")

    properties: Optional[str] = None
    components: Optional[list[str]] = None
    aligner: Optional[str] = None
    distributed: bool = True
    score: Literal["correlation", "specific", "variance-share"] = "correlation"

    def validate(self) -> None:
        super().validate()
        local_file(self, "properties", "yaml")


@dataclass(frozen=True)
class RetrieveConfig(TextModelOptions, OutputOptions, StoreOptions):
    """``vitdecomp query retrieve``: retrieval by property, from a probe text or probe images."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out", "property")

    property: str = ""
    text: str = ""
    image_ids: Optional[list[str]] = None
    top_components: int = 5
    top_images: int = 16
    properties: Optional[str] = None
    index: Literal["auto", "exact", "lance"] = "auto"
    index_threshold: int = 100_000
    nprobes: Optional[int] = None
    aligner: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        positive(self, "top_components", "top_images", "index_threshold", "nprobes")
        local_file(self, "properties", "yaml")


@dataclass(frozen=True)
class HeadOptions(TextModelOptions, OutputOptions, StoreOptions):
    """How predictions are made from a store (``ablate`` and ``mitigate``)."""

    label_column: str = ""
    class_names: Optional[list[str]] = None
    head: Optional[Literal["zeroshot", "probe", "model"]] = None
    probe: Optional[str] = None
    checkpoint: Optional[str] = None
    aligner: Optional[str] = None
    split_column: Optional[str] = None


ABLATION_KINDS = ("all", "attn", "mlp", "conv")


@dataclass(frozen=True)
class AblateConfig(HeadOptions):
    """``vitdecomp query ablate``: mean-ablation curves."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out", "label_column")

    eval_split: Optional[list[str]] = None
    fit_split: Optional[list[str]] = None
    order: Literal["reverse", "forward"] = "reverse"
    kinds: Optional[list[Literal["all", "attn", "mlp", "conv"]]] = None


@dataclass(frozen=True)
class MitigateConfig(HeadOptions):
    """``vitdecomp query mitigate``: spurious-feature mitigation by mean-ablating the top-k components."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out", "label_column")

    group_column: str = ""
    spurious: str = ""
    core: str = ""
    properties: Optional[str] = None
    k: int = 10
    ranking: Literal["compattribute", "signed"] = "compattribute"
    score: Literal["correlation", "specific", "variance-share"] = "correlation"
    protocol: Literal["heldout", "same-pool"] = "heldout"
    fit_split: Optional[list[str]] = None
    eval_split: Optional[list[str]] = None
    val_fraction: float = 0.5
    random_draws: int = 5
    seed: int = 0
    name: str = "mitigation"

    def validate(self) -> None:
        super().validate()
        positive(self, "k")
        fraction(self, "val_fraction")
        local_file(self, "properties", "yaml")
        if self.random_draws < 0:
            raise OptionError("random_draws", f"must not be negative, got {self.random_draws!r}")
        if self.ranking == "signed" and self.score != "correlation":
            raise OptionError("score", f"{self.score!r} is a CompAttribute score: it applies to the compattribute "
                                       "ranking only (drop it, or use ranking compattribute)")
        import re

        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
            raise OptionError("name", f"{self.name!r} must be letters, digits, '_', '.' or '-' (it names the "
                                      "output files)")


@dataclass(frozen=True)
class HeatmapConfig(TextModelOptions, OutputOptions, StoreOptions):
    """``vitdecomp query heatmap``: token heatmaps of chosen heads, overlays, segmentation metrics."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store", "out", "components")

    components: Optional[list[str]] = None
    image_ids: Optional[list[str]] = None
    top_n: Optional[int] = None
    retrieval: Optional[str] = None
    text: Optional[str] = None
    class_index: Optional[str] = None
    aligner: Optional[str] = None
    checkpoint: Optional[str] = None
    mask_column: Optional[str] = None
    masks_dir: Optional[str] = None
    batch_size: int = 16
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def validate(self) -> None:
        super().validate()
        positive(self, "top_n", "batch_size")


@dataclass(frozen=True)
class ReportConfig(OutputOptions, S3Options):
    """``vitdecomp query report``: one static HTML page of every query section in ``out``."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)

    title: Optional[str] = None


@dataclass(frozen=True)
class InterpretabilityConfig(OutputOptions, S3Options):
    """``vitdecomp query interpretability``: per-head property labels from TextSpan texts, entanglement
    and association scores (:mod:`vitdecomp.query.interpretability`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("textspan", "out")

    textspan: str = ""
    properties: Optional[str] = None
    vocabulary: Optional[str] = None
    texts_per_head: Optional[int] = None
    min_share: float = 0.2

    def validate(self) -> None:
        super().validate()
        positive(self, "texts_per_head")
        local_file(self, "properties", "yaml")
        local_file(self, "vocabulary", "yaml")
        if not 0.0 < self.min_share <= 1.0:
            raise OptionError("min_share", f"must be in (0, 1], got {self.min_share!r}")


@dataclass(frozen=True)
class ServeConfig(TextModelOptions, StoreOptions):
    """``vitdecomp serve``: the explorer, a local web app over a store (:mod:`vitdecomp.serve`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("store",)

    fit: Optional[str] = None
    query: Optional[str] = None
    aligner: Optional[str] = None
    checkpoint: Optional[str] = None
    properties: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    index_threshold: int = 100_000
    nprobes: Optional[int] = None
    top_images: int = 16
    top_components: int = 5
    max_upload_bytes: int = 8 * 1024 * 1024
    index_cache: Optional[str] = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def validate(self) -> None:
        super().validate()
        positive(self, "index_threshold", "nprobes", "top_images", "top_components", "max_upload_bytes")
        local_file(self, "properties", "yaml")
        if not 0 <= self.port <= 65535:
            raise OptionError("port", f"must be in 0..65535 (0: any free port), got {self.port}")
