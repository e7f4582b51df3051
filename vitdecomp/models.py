"""Model loading: ``"timm:<name>"`` and ``"open_clip:<architecture>"`` → model, preprocessing, readout.

Names are checked before anything is built or downloaded; unknown names and tags fail with close
matches. ``pretrained`` is a weights tag (open_clip: ``laion2b_s34b_b88k``; timm: the part after the
dot, ``fb_in1k``, or ``True`` for the default tag); ``checkpoint`` is a local weights file
(``.safetensors``, ``.pt``/``.pth``/``.bin``) loaded into the named architecture. Nothing is
downloaded when ``pretrained`` is false.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from .errors import InputError, UnknownModelError

log = logging.getLogger(__name__)

LIBRARIES = ("timm", "open_clip")
_EXTENSIONS: list[str] = []        # modules that register architectures with timm/open_clip on import


def register_extension(module: str) -> None:
    """Record that importing ``module`` registers model architectures (e.g. ``vitdecomp.toyworld``), so
    that Ray workers import it before they build a model by name."""
    if module not in _EXTENSIONS:
        _EXTENSIONS.append(module)


def import_extensions(manifest) -> None:
    """Import the modules that registered the architectures of a store's models (recorded in its
    manifest), e.g. ``vitdecomp.toyworld``. Only vitdecomp's own modules are imported: a manifest is
    data and never chooses code to run."""
    import importlib

    for module in ((manifest.get("package") or {}).get("extensions") or ()):
        if isinstance(module, str) and (module == "vitdecomp" or module.startswith("vitdecomp.")):
            importlib.import_module(module)


def extension_modules() -> tuple[str, ...]:
    """Modules that registered architectures in this process (see :func:`register_extension`)."""
    return tuple(_EXTENSIONS)


@dataclass(frozen=True)
class Readout:
    """What ``z`` is for this model.

    ``kind``: ``"pre_logits"`` (timm: what the classifier head consumes) or ``"image_embedding"``
    (open_clip: ``encode_image``, projected into the joint text-image space); ``pool``: how tokens
    are pooled (``token[0]`` = CLS, ``mean[k:]``); ``dim``: size of ``z``.
    """

    kind: str
    pool: str
    dim: int
    space: str  # "clip" when z lives in a CLIP joint embedding space


@dataclass
class LoadedModel:
    """A model ready for :func:`vitdecomp.decompose`: ``model`` (eval mode), its ``transform``
    (PIL image → normalised tensor), ``readout`` description and provenance fields."""

    name: str
    library: str
    arch: str
    model: nn.Module
    transform: Callable
    readout: Readout
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    preprocess: dict = field(default_factory=dict)
    tokenizer: Optional[Callable] = None  # open_clip only

    @property
    def vision(self) -> nn.Module:
        """The vision tower that is decomposed (``model.visual`` for open_clip)."""
        return getattr(self.model, "visual", self.model)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.preprocess.get("input_size", (3, 224, 224))[-2:])


def _timm_pool(model: nn.Module) -> str:
    """How a timm model pools its tokens into the readout (``Readout.pool``)."""
    gp = getattr(model, "global_pool", "avg")
    if getattr(model, "attn_pool", None) is not None or gp == "map":
        return "attn_pool"                              # SigLIP MAP head: a latent query over all tokens
    if gp == "token":
        # DeiT distilled (dist_token), PiT distilled (num_tokens=2): both tokens, each normed
        if getattr(model, "dist_token", None) is not None or getattr(model, "num_tokens", 1) == 2:
            return "mean(token[0], token[1]) of normed tokens"
        return "token[0]"
    npt = getattr(model, "num_prefix_tokens", None)
    if npt is None:                                     # Swin, MaxViT: mean over the last stage's grid
        return "mean[grid]"
    if not isinstance(getattr(model, "norm", nn.Identity()), nn.Identity):
        return f"mean[{npt}:] of normed tokens"
    return f"mean[{npt}:]"


def _timm_readout_dim(model: nn.Module) -> int:
    """Size of ``z``: MaxViT's readout is its head's ``pre_logits`` output (``head_hidden_size``)."""
    fc = getattr(getattr(getattr(model, "head", None), "pre_logits", None), "fc", None)
    return int(fc.out_features) if isinstance(fc, nn.Linear) else int(model.num_features)


def _open_clip_pool(v: nn.Module) -> str:
    """How an open_clip vision tower pools (``Readout.pool``): its own ViT pooling, or for a ``TimmModel``
    tower (SigLIP, EVA-CLIP, PE, ViTamin, ConvNeXt …) the timm trunk's pooling or the adapter head's pool."""
    trunk = getattr(v, "trunk", None)
    if trunk is not None:                               # open_clip TimmModel: a timm trunk + an adapter head
        pool = getattr(getattr(v, "head", None), "pool", None)
        return type(pool).__name__ if pool is not None else _timm_pool(trunk)
    if getattr(v, "attn_pool", None) is not None or getattr(v, "attnpool", None) is not None:
        return "attn_pool"                              # attentional pooler (CoCa), ModifiedResNet's attnpool
    return "token[0]" if getattr(v, "pool_type", "tok") == "tok" else "mean[1:]"


def _open_clip_dim(v: nn.Module) -> int:
    """Size of open_clip's image embedding, read from the tower's modules (no forward pass): ``output_dim``
    of open_clip's own towers; for a ``TimmModel`` the last Linear of its head (``timm_proj='linear'``/``'mlp'``),
    else the trunk's classifier (``timm_proj`` unset), else the trunk's pre-logits width (``'none'``)."""
    if getattr(v, "output_dim", None) is not None:
        return int(v.output_dim)
    trunk = getattr(v, "trunk", None)
    if trunk is None:
        raise UnknownModelError(f"cannot tell the image embedding size of the open_clip tower {type(v).__qualname__} "
                                "(no output_dim, no timm trunk)")
    linears = [m for m in getattr(v, "head", nn.Sequential()).modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    cls = trunk.get_classifier() if hasattr(trunk, "get_classifier") else None
    if isinstance(cls, nn.Linear):
        return int(cls.out_features)
    return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)


class MissingTokenizer:
    """Stands in for an open_clip tokenizer that cannot be built here (SigLIP's needs ``transformers``,
    some need a Hugging Face download): the image tower still loads and decomposes; tokenizing raises."""

    def __init__(self, arch: str, reason: str):
        self.arch, self.reason = arch, reason

    def __call__(self, *args, **kwargs):
        raise InputError(f"the text tokenizer of open_clip:{self.arch} is not available ({self.reason}); "
                         "install what it names (e.g. pip install transformers sentencepiece) or put it in the "
                         "Hugging Face cache (HF_HOME) to encode text with this model")


def _tokenizer(arch: str):
    """open_clip's tokenizer for ``arch``, or a :class:`MissingTokenizer` when it cannot be built offline."""
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        log.warning("open_clip:%s: text tokenizer unavailable (%s); image decomposition is unaffected", arch, reason)
        return MissingTokenizer(arch, reason)


def parse_name(name: str) -> tuple[str, str]:
    """``"timm:vit_base_patch16_224"`` → ``("timm", "vit_base_patch16_224")``."""
    lib, sep, arch = name.partition(":")
    if not sep or lib not in LIBRARIES or not arch:
        raise UnknownModelError(f"model name {name!r} must look like 'timm:<model>' or 'open_clip:<architecture>' "
                                "(e.g. 'timm:deit_tiny_patch16_224', 'open_clip:ViT-B-16')")
    return lib, arch


def _suggest(what: str, name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f"unknown {what} {name!r}" + (f"; did you mean {close}?" if close else f" ({len(choices)} available)")


def check_name(name: str, pretrained: Union[bool, str, None] = None) -> tuple[str, str]:
    """Validate a model name (and weights tag) without building anything."""
    lib, arch = parse_name(name)
    if lib == "timm":
        import timm

        base, _, tag = arch.partition(".")
        if base not in timm.list_models():
            raise UnknownModelError(_suggest("timm model", base, timm.list_models()) +
                                    " — list them with timm.list_models('*pattern*')")
        if isinstance(pretrained, str) and tag and pretrained != tag:
            raise UnknownModelError(f"{name}: weights tag given twice ({tag!r} in the name, {pretrained!r} as pretrained)")
        tag = tag or (pretrained if isinstance(pretrained, str) else "")
        if tag:
            tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
            if tag not in tags:
                raise UnknownModelError(_suggest(f"weights tag for timm:{base}", tag, tags) + f"; known tags: {tags}")
    else:
        import open_clip

        if arch not in open_clip.list_models():
            raise UnknownModelError(_suggest("open_clip architecture", arch, open_clip.list_models()) +
                                    " — list them with open_clip.list_models()")
        if isinstance(pretrained, str):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if pretrained not in tags:
                raise UnknownModelError(_suggest(f"pretrained tag for open_clip:{arch}", pretrained, tags) +
                                        f"; known tags: {tags}")
        elif pretrained is True:
            raise UnknownModelError(f"open_clip:{arch}: pass pretrained=<tag>, one of "
                                    f"{open_clip.list_pretrained_tags_by_model(arch)}")
    return lib, arch


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _DropRandomInit(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model '<arch>'. Model initialized randomly."
    for one architecture, and nothing else: a checkpoint is loaded right after, so it would mislead."""

    def __init__(self, arch: str):
        super().__init__()
        self.text = f"No pretrained weights loaded for model '{arch}'"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith(self.text))


@contextlib.contextmanager
def _no_random_init_warning(arch: str, when: bool):
    if not when:
        yield
        return
    root, f = logging.getLogger(), _DropRandomInit(arch)
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def load_state_dict(path: str) -> dict:
    """Load weights from a local file without unpickling code (safetensors, or torch ``weights_only``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def verify_checkpoint(lm: "LoadedModel", path: str) -> None:
    """Check, without loading it into the model, that the weights file at ``path`` is readable without
    unpickling code and fits ``lm``'s architecture (same keys, same shapes). Raises :class:`OptionError`
    (option ``checkpoint``) with one line saying what does not fit."""
    from .config import OptionError

    if not os.path.isfile(path):
        raise OptionError("checkpoint", f"{path!r} does not exist (expected a local weights file)")
    shapes: dict[str, tuple] = {}
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise OptionError("checkpoint", f"{path!r} is not a readable safetensors file ({str(e)[:120]})") from None
    else:
        try:
            sd = load_state_dict(path)
        except Exception as e:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError, KeyError…
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            stem = os.path.splitext(path)[0]
            raise OptionError("checkpoint", (
                f"{path!r} cannot be loaded as plain weights ({type(e).__name__}: {first}); it may hold pickled "
                "Python objects, which are never unpickled here; convert it to safetensors (where you trust the file): "
                f"python -c \"import torch; from safetensors.torch import save_file; sd = torch.load({path!r}, "
                f"weights_only=False); sd = sd.get('state_dict', sd.get('model', sd)); "
                f"save_file({{k: v.contiguous() for k, v in sd.items()}}, {stem + '.safetensors'!r})\"")) from None
        if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
            raise OptionError("checkpoint", f"{path!r} does not hold a mapping of parameter names to tensors")
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
    want = {k: tuple(v.shape) for k, v in lm.model.state_dict().items()}
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    wrong = [f"{k}: file {list(shapes[k])} vs model {list(want[k])}" for k in want if k in shapes and shapes[k] != want[k]]
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:2]})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[:2]})" if wrong else ""]
        raise OptionError("checkpoint", f"{path!r} does not fit {lm.name}: " + "; ".join(p for p in parts if p) +
                                        " — is it the checkpoint of another model or size?")


def _seeded(seed: int, build):
    """``build()`` with the CPU RNG seeded by ``seed`` and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _fetch(build, name: str, tag):
    """Build a model; a failed weights download becomes one clear error."""
    try:
        return build()
    except (RuntimeError, OSError) as e:
        if tag and any(w in str(e) for w in ("download", "Hub", "connection", "resolve")):
            raise UnknownModelError(
                f"could not fetch the weights of {name} (tag {tag!r}): {str(e)[:300]}. Put them in the Hugging Face "
                "cache first (HF_HOME), or download the file and pass checkpoint=<path>") from e
        raise


def load_model(
    name: str,
    pretrained: Union[bool, str, None] = False,
    checkpoint: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    load_weights: bool = True,
    seed: int = 0,
    **model_kwargs,
) -> LoadedModel:
    """Build a model by name, in eval mode, with its own preprocessing.

    Args:
        name: ``"timm:<model>[.<tag>]"`` or ``"open_clip:<architecture>"``.
        pretrained: weights tag, ``True`` (timm default tag) or ``False`` (random init, no download).
        checkpoint: local weights file loaded into the architecture (strict).
        load_weights: ``False`` builds the architecture with the preprocessing of ``pretrained`` but
            downloads and loads nothing (a driver that only needs components and transforms).
        seed: random-initialised parameters are drawn from this seed, under ``torch.random.fork_rng``
            (the global RNG is left alone), so a model name and a seed identify random weights.
        model_kwargs: passed to ``timm.create_model`` / ``open_clip.create_model_and_transforms``.
    """
    lib, arch = check_name(name, pretrained)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UnknownModelError(f"checkpoint {checkpoint!r} does not exist (expected a local weights file)")
    if checkpoint is not None and pretrained:
        raise UnknownModelError("pass either pretrained=<tag> or checkpoint=<file>, not both")
    tag = pretrained if isinstance(pretrained, str) else None
    if lib == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config

        base, _, name_tag = arch.partition(".")
        tag = name_tag or tag
        full = f"{base}.{tag}" if tag else base
        model = _fetch(lambda: _seeded(seed, lambda: timm.create_model(
            full, pretrained=bool(pretrained) and load_weights, **model_kwargs)), name, tag)
        if checkpoint and load_weights:
            model.load_state_dict(load_state_dict(checkpoint))
        cfg = resolve_data_config({}, model=model)
        if model_kwargs.get("img_size") is not None:      # a model built for another size: preprocess for it
            size = model_kwargs["img_size"]
            cfg["input_size"] = (3, *((size, size) if isinstance(size, int) else tuple(size)))
        transform = create_transform(**cfg, is_training=False)
        readout = Readout("pre_logits", _timm_pool(model), _timm_readout_dim(model),
                          "clip" if "clip" in base else "features")
        preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        tokenizer = None
    else:
        import open_clip

        if tag and not load_weights:       # the tag's preprocessing, without fetching its weights
            pcfg = open_clip.get_pretrained_cfg(arch, tag)
            for key in ("mean", "std", "interpolation", "resize_mode"):
                if pcfg.get(key) is not None:
                    model_kwargs.setdefault(f"image_{key}", pcfg[key])
        with _no_random_init_warning(arch, when=bool(checkpoint)):
            model, _, transform = _fetch(lambda: _seeded(seed, lambda: open_clip.create_model_and_transforms(
                arch, pretrained=tag if load_weights else None, **model_kwargs)), name, tag)
        if checkpoint and load_weights:
            model.load_state_dict(load_state_dict(checkpoint))
        v = model.visual
        size = tuple(v.image_size) if isinstance(v.image_size, (tuple, list)) else (v.image_size,) * 2
        pp = getattr(v, "preprocess_cfg", {}) or {}
        preprocess = {"input_size": [3, *size], "mean": list(pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      "std": list(pp.get("std", open_clip.OPENAI_DATASET_STD)),
                      "interpolation": pp.get("interpolation", "bicubic"), "resize_mode": pp.get("resize_mode", "shortest")}
        readout = Readout("image_embedding", _open_clip_pool(v), _open_clip_dim(v), "clip")
        tokenizer = _tokenizer(arch)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=f"{lib}:{arch}", library=lib, arch=arch, model=model, transform=transform,
                       readout=readout,
                       # the weights actually in the model: a tag in the name with pretrained=False is random init
                       pretrained=(tag or "default") if (pretrained or (tag and not load_weights)) else None,
                       checkpoint=checkpoint, checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None,
                       preprocess=preprocess, tokenizer=tokenizer)


# Every supported family → (random-initialised stand-in, small-build ``model_kwargs``). The test-suite
# (tests/test_supported_models.py) checks each entry for exactness and against a hand formula, and
# the README "Supported models" table lists them. To add a family, append one line:
#     "family_label": ("timm:<model>", dict(<kwargs that keep the build small>)),
# (``{}`` = the default build is small enough). Keys are short family labels, unique.
SUPPORTED_FAMILIES = {
    "vit": ("timm:deit_tiny_patch16_224", {}),
    "dinov2": ("timm:vit_small_patch14_dinov2", dict(depth=4, img_size=112)),
    "dinov2_reg": ("timm:vit_small_patch14_reg4_dinov2", dict(depth=4, img_size=112)),
    "vit_clip": ("timm:vit_base_patch16_clip_224", dict(embed_dim=64, depth=3, num_heads=4, img_size=64)),
    "open_clip_vit": ("open_clip:ViT-S-16", {}),
    "eva02": ("timm:eva02_tiny_patch14_224", dict(depth=3, img_size=56)),
    # Perception Encoder: EVA + AttentionRope; core = attention-pool (MAP) head (tests/test_families_pe.py)
    "pe_core": ("timm:vit_pe_core_tiny_patch16_384", dict(depth=2, embed_dim=48, num_heads=3, img_size=64)),
    "pe_lang": ("timm:vit_pe_lang_large_patch14_448", dict(depth=2, embed_dim=48, num_heads=3, img_size=56)),
    "siglip": ("timm:vit_base_patch16_siglip_224", dict(embed_dim=64, depth=3, num_heads=4, img_size=64)),
    "siglip_gap": ("timm:vit_base_patch16_siglip_gap_224", dict(embed_dim=64, depth=3, num_heads=4, img_size=64)),
    "swin": ("timm:swin_tiny_patch4_window7_224", dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))),
    "swinv2": ("timm:swinv2_tiny_window8_256", dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                                                  window_size=2, img_size=64)),
    # Swin V2-CR: post-norm blocks, extra stream norms norm3 (rules/swin_v2_cr.py; tests/test_families_swinv2_cr.py)
    "swinv2_cr": ("timm:swinv2_cr_tiny_ns_224", dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                                                     window_size=2, img_size=64)),
    "maxvit": ("timm:maxvit_tiny_tf_224", dict(embed_dim=(32, 32, 64, 64), depths=(1, 1, 2, 1), stem_width=16,
                                               head_hidden_size=64, img_size=128, transformer_dim_head=16)),
    "maxvit_rw": ("timm:maxvit_rmlp_pico_rw_256", dict(img_size=128, depths=(1, 1, 1, 1))),
    # CoAtNet (MbConv + TransformerBlock2d), MaxxViT v2 (ConvNeXt + grid attention): rules/coatnet.py;
    # tests/test_families_coatnet.py covers CoAtNeXt, coatnet_bn, MaxxViT v1 and the parallel MaxViT too
    "coatnet": ("timm:coatnet_nano_rw_224", dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64),
                                                 stem_width=(16, 32), transformer_dim_head=16)),
    "maxxvit_v2": ("timm:maxxvitv2_nano_rw_256", dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64),
                                                      stem_width=(16, 32), transformer_dim_head=16)),
    # ViT variants (vitdecomp/engine/rules/vit_variants.py; tests/test_families_vit_variants.py)
    "deit_distilled": ("timm:deit_tiny_distilled_patch16_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "beit": ("timm:beit_base_patch16_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "beitv2": ("timm:beitv2_base_patch16_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "cait": ("timm:cait_xxs24_224", dict(embed_dim=48, num_heads=3, depth=2, depth_token_only=2, img_size=48)),
    # XCiT: class-attention blocks with a class-token stream norm (rules/xcit.py; tests/test_families_xcit.py)
    "xcit": ("timm:xcit_nano_12_p16_224", dict(depth=2, cls_attn_layers=2, embed_dim=48, num_heads=4, img_size=64)),
    "vit_relpos": ("timm:vit_relpos_small_patch16_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "vit_srelpos_gap": ("timm:vit_srelpos_small_patch16_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "vit_relpos_respost": ("timm:vit_relpos_base_patch16_rpn_224", dict(embed_dim=48, num_heads=3, depth=2,
                                                                        img_size=48, fc_norm=True)),
    "eva_post_norm": ("timm:eva02_small_patch14_224", dict(depth=2, img_size=42, use_post_norm=True)),
    "vit_diff_attention": ("timm:vit_dwee_patch16_reg1_gap_256", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "vit_parallel_scaling": ("timm:vit_base_patch16_xp_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "vit_diff_parallel_scaling": ("timm:vit_dpwee_patch16_reg1_gap_256", dict(embed_dim=48, num_heads=3, depth=2,
                                                                            img_size=48)),
    "vit_parallel_things": ("timm:vit_small_patch16_18x2_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    # NaFlexViT, DINOv3 (EVA, per-token norm + mean), ViT ResPostBlock (rules/naflexvit.py, vit_variants.py;
    # tests/test_families_naflexvit.py)
    "naflexvit": ("timm:naflexvit_base_patch16_gap", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "naflexvit_map": ("timm:naflexvit_base_patch16_map", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "dinov3": ("timm:vit_small_patch16_dinov3", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    "vit_respost": ("timm:vit_base_patch16_rpn_224", dict(embed_dim=48, num_heads=3, depth=2, img_size=48)),
    # SAM ViT: windowed + global attention, conv neck / LayerNorm2d neck (rules/sam.py; tests/test_families_sam.py)
    "samvit": ("timm:samvit_base_patch16", dict(img_size=64, embed_dim=48, depth=2, num_heads=2, window_size=3,
                                                global_attn_indexes=(1,), neck_chans=16)),
    "samvit_norm_neck": ("timm:samvit_base_patch16_224", dict(img_size=64, embed_dim=48, depth=2, num_heads=2,
                                                             window_size=3, global_attn_indexes=(1,))),
    # LeViT: BatchNorm linears, act before the out-projection (no token terms), attention downsampling that
    # replaces the stream, mean readout; linear and use_conv variants (rules/levit.py; tests/test_families_levit.py)
    "levit": ("timm:levit_128s", dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
                                      depth=(1, 1, 2))),
    "levit_conv": ("timm:levit_conv_128s", dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4),
                                                depth=(1, 1, 2))),
    # PiT: class-token stream carried through each stage's pooling fc (rules/pit.py; tests/test_families_pit.py)
    "pit": ("timm:pit_ti_224", dict(img_size=64, base_dims=(8, 8, 8), depth=(1, 1, 2), heads=(2, 4, 8))),
    "pit_distilled": ("timm:pit_ti_distilled_224", dict(img_size=64, base_dims=(8, 8, 8), depth=(1, 1, 2),
                                                        heads=(2, 4, 8))),
    # CoCa: open_clip ViT read out through an AttentionalPooler (query 0, the contrastive token, then ln_post and
    # proj; rules/coca.py; tests/test_families_coca.py); pool width 48 ≠ tower width 64, tiny text towers
    "coca": ("open_clip:coca_ViT-B-32", dict(
        embed_dim=48,
        vision_cfg=dict(image_size=64, layers=2, width=64, head_width=16, patch_size=16, attentional_pool=True,
                        attn_pooler_heads=4, attn_pooler_queries=5, output_tokens=True),
        text_cfg=dict(context_length=76, vocab_size=49408, width=32, heads=2, layers=1, embed_cls=True,
                      output_tokens=True),
        multimodal_cfg=dict(context_length=76, vocab_size=49408, width=32, heads=2, layers=1, attn_pooler_heads=2))),
}


def supported_families() -> dict[str, tuple[str, dict]]:
    """Every supported family: ``{label: (stand-in model name, small-build model_kwargs)}`` (a copy);
    ``load_model(name, **kwargs)`` builds the stand-in."""
    return {k: (name, dict(kw)) for k, (name, kw) in SUPPORTED_FAMILIES.items()}


def supported_models() -> tuple[str, ...]:
    """The stand-in model names of every supported family (see :func:`supported_families` for the
    ``model_kwargs`` that build them small)."""
    return tuple(name for name, _ in SUPPORTED_FAMILIES.values())


# Older views, kept for their callers: the first stand-ins, built with their default sizes
# (tests/test_compact_store.py), and the stand-ins built with reduced sizes (name → model_kwargs).
TEST_MODELS = ("timm:deit_tiny_patch16_224", "timm:vit_small_patch14_dinov2", "timm:vit_small_patch14_reg4_dinov2",
               "timm:vit_base_patch16_clip_224", "open_clip:ViT-S-16")
FAMILY_TEST_MODELS = {name: kw for name, kw in SUPPORTED_FAMILIES.values() if kw}


@dataclass(frozen=True)
class ReferenceLayout:
    """A published component set: ``model`` (+ ``pretrained`` tag) decomposed with ``blocks`` and ``heads``.

    ``blocks`` is a range of block indices or the module path of the first decomposed block (earlier
    blocks fold into ``embed``); ``counts`` is what :func:`vitdecomp.components_for` returns, by kind.
    """

    model: str
    pretrained: Optional[str]
    blocks: object
    heads: bool
    counts: dict

    def kwargs(self) -> dict:
        """Keyword arguments for :func:`vitdecomp.decompose` / :func:`vitdecomp.components_for`."""
        return {"blocks": self.blocks, "heads": self.heads}


# The component sets of the ViT decomposition paper (RepDecompose / CompAlign experiments), so
# published experiments can be rerun with real weights. ViT-B-sized towers decompose blocks 7–11.
REFERENCE_LAYOUTS = {
    "deit_b": ReferenceLayout("timm:deit_base_patch16_224", "fb_in1k", range(7, 12), True,
                              {"embed": 1, "head": 60, "mlp": 5, "bias": 1}),
    "dino_b": ReferenceLayout("timm:vit_base_patch16_224", "dino", range(7, 12), True,
                              {"embed": 1, "head": 60, "mlp": 5, "bias": 1}),
    "dinov2_b": ReferenceLayout("timm:vit_base_patch14_dinov2", "lvd142m", range(7, 12), True,
                                {"embed": 1, "head": 60, "mlp": 5, "bias": 1}),
    "clip_b16": ReferenceLayout("open_clip:ViT-B-16", "laion2b_s34b_b88k", range(7, 12), True,
                                {"embed": 1, "head": 60, "mlp": 5, "bias": 1}),
    "swin_b": ReferenceLayout("timm:swin_base_patch4_window7_224", "ms_in22k_ft_in1k", "layers.2.blocks.14", True,
                              {"embed": 1, "head": 128, "mlp": 6, "bias": 1}),
    "maxvit_s": ReferenceLayout("timm:maxvit_small_tf_224", "in1k", "stages.2.blocks.3", True,
                                {"embed": 1, "conv": 4, "head": 144, "mlp": 8, "bias": 1}),
}


def reference_layout(key: str) -> ReferenceLayout:
    """One of :data:`REFERENCE_LAYOUTS` (``deit_b``, ``dino_b``, ``dinov2_b``, ``clip_b16``, ``swin_b``, ``maxvit_s``)."""
    if key not in REFERENCE_LAYOUTS:
        raise UnknownModelError(_suggest("reference layout", key, list(REFERENCE_LAYOUTS)) +
                                f"; known: {list(REFERENCE_LAYOUTS)}")
    return REFERENCE_LAYOUTS[key]


def rebuild_model(manifest: dict, checkpoint: Optional[str] = None, device: str = "cpu"):
    """The store's model exactly as the decompose job built it (weights tag or checkpoint with the
    recorded SHA-256; random-init models from the recorded seed) — same preprocessing."""
    import_extensions(manifest)
    mm = manifest["model"]
    want_sha = mm.get("checkpoint_sha256")
    if want_sha and not checkpoint:
        raise InputError(f"the store was made with the checkpoint {mm.get('checkpoint')!r} "
                         f"(SHA-256 {want_sha[:12]}…): pass its path as the checkpoint")
    if checkpoint and not want_sha:
        raise InputError(f"the store was made without a checkpoint ({mm['name']}, weights "
                         f"{mm.get('pretrained') or 'random init, seed %d' % mm.get('seed', 0)}); drop the checkpoint")
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise InputError(f"checkpoint {checkpoint!r} does not exist")
        got = sha256_file(checkpoint)
        if got != want_sha:
            raise InputError(f"checkpoint {checkpoint!r} (SHA-256 {got[:12]}…) is not the checkpoint the store was "
                             f"made with ({mm.get('checkpoint')!r}, SHA-256 {want_sha[:12]}…)")
    lm = load_model(mm["name"], pretrained=mm.get("pretrained") or False, checkpoint=checkpoint, device=device,
                    seed=int(mm.get("seed", 0)))
    if json.dumps(lm.preprocess, sort_keys=True) != json.dumps(manifest.get("preprocess"), sort_keys=True):
        raise InputError(f"the rebuilt {mm['name']} preprocesses images differently from the store "
                         f"({lm.preprocess} vs {manifest.get('preprocess')}): the installed timm/open_clip "
                         "differ from the ones that made the store")
    return lm
