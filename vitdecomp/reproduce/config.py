"""Frozen configs of the ``reproduce`` experiments (flags are built from these type hints, as for every
other job). Imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from ..config import Config, OptionError, local_file, positive


@dataclass(frozen=True)
class ReproduceOptions(Config):
    """Options every reproduce experiment shares: dataset, models, weights, compute."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("root", "out")

    root: str = ""
    out: str = ""
    model: Optional[str] = None
    models: Optional[list[str]] = None
    pretrained: bool = False
    pretrained_tag: Optional[str] = None
    checkpoint: Optional[str] = None
    head: Optional[Literal["zeroshot", "probe", "model"]] = None
    class_names: Optional[list[str]] = None
    batch_size: int = 32
    dtype: Literal["fp16", "fp32"] = "fp16"
    concurrency: int = 1
    num_cpus: Optional[int] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: Optional[str] = None
    cache_dir: Optional[str] = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        positive(self, "batch_size", "concurrency", "num_cpus")
        for name in ("root", "out"):
            if str(getattr(self, name)).startswith("s3://"):
                raise OptionError(name, "reproduce reads the dataset from, and writes to, local folders; run the "
                                        "decompose, fit and query commands for data on S3")
        if self.model and self.models:
            raise OptionError("models", "pass either one model or a list of models, not both")
        if self.checkpoint and self.pretrained:
            raise OptionError("checkpoint", "pass either --pretrained (downloaded weights) or a local checkpoint, "
                                            "not both")

    def model_list(self) -> list[str]:
        """The models asked for (``--models a,b`` and ``--models a b`` both work), in order."""
        if self.model:
            return [self.model]
        return [m.strip() for item in (self.models or []) for m in str(item).split(",") if m.strip()]


@dataclass(frozen=True)
class WaterbirdsConfig(ReproduceOptions):
    """``vitdecomp reproduce waterbirds``: spurious-feature mitigation on the Waterbirds release."""

    teacher: Optional[str] = None
    teacher_pretrained: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    aligner: Optional[str] = None
    align_epochs: int = 20
    align_lr: float = 3e-4
    properties: Optional[str] = None
    spurious: str = "Waterbirds spurious"
    core: str = "Waterbirds core"
    k: int = 10
    ranking: Literal["compattribute", "signed"] = "compattribute"
    score: Literal["correlation", "specific", "variance-share"] = "correlation"
    protocol: Literal["heldout", "same-pool"] = "heldout"
    random_draws: int = 5

    def validate(self) -> None:
        super().validate()
        positive(self, "k", "align_epochs")
        local_file(self, "properties", "yaml")
        if self.random_draws < 0:
            raise OptionError("random_draws", f"must not be negative, got {self.random_draws!r}")
        if self.align_lr <= 0:
            raise OptionError("align_lr", f"must be positive, got {self.align_lr!r}")
        if self.ranking == "signed" and self.score != "correlation":
            raise OptionError("score", f"{self.score!r} is a CompAttribute score: it applies to the compattribute "
                                       "ranking only (drop it, or use ranking compattribute)")


@dataclass(frozen=True)
class ImagenetAblationConfig(ReproduceOptions):
    """``vitdecomp reproduce imagenet-ablation``: zero-shot accuracy under mean ablation."""

    labels: Optional[str] = None
    synsets: Optional[str] = None
    order: Literal["reverse", "forward"] = "reverse"

    def validate(self) -> None:
        super().validate()
        local_file(self, "labels")
        local_file(self, "synsets")


@dataclass(frozen=True)
class SegmentationConfig(ReproduceOptions):
    """``vitdecomp reproduce segmentation``: token heatmaps against binary masks."""

    components: Optional[list[str]] = None
    last_layers: int = 4
    text: Optional[str] = None
    class_index: Optional[str] = None
    limit: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        positive(self, "last_layers", "limit")
        if self.text and self.class_index:
            raise OptionError("text", "pass either a text or a class index, not both")
