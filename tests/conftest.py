"""Shared fixtures: random-initialised tiny/small models (no downloads) and seeded images."""
from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vitdecomp  # noqa: E402


@functools.lru_cache(maxsize=None)
def model(name: str, dtype: torch.dtype = torch.float32) -> vitdecomp.LoadedModel:
    """A random-initialised model, built once per (name, dtype) with a fixed seed."""
    torch.manual_seed(0)
    return vitdecomp.load_model(name, pretrained=False, dtype=dtype)


def images_for(lm: vitdecomp.LoadedModel, batch: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = lm.image_size
    return torch.randn(batch, 3, h, w, generator=g, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
