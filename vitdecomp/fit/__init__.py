"""Fitting on a store: CompAlign (maps into a CLIP space), TextSpan (a text basis per component) and
linear probes, plus the text embeddings they use."""
from .compalign import Aligner, aligned_batches, fit_store
from .jobs import run_compalign, run_probe, run_textspan
from .probe import LinearHead, fit_probe
from .text import encode_texts, read_pool
from .textspan import Moments, textspan

__all__ = ["Aligner", "LinearHead", "Moments", "aligned_batches", "encode_texts", "fit_probe", "fit_store",
           "read_pool", "run_compalign", "run_probe", "run_textspan", "textspan"]
