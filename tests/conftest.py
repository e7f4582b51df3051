"""Shared fixtures: random-initialised tiny/small models (no downloads) and seeded images."""
from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests talk only to 127.0.0.0/8: dummy cloud credentials and no instance-metadata lookups, set
# before Ray starts so that its workers inherit them. S3 endpoints are always passed explicitly.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-0123456789",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_k] = _v
for _k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
    os.environ.pop(_k, None)

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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) shared by the job tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
