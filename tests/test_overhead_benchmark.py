"""The per-family overhead benchmark (``benchmark overhead --families``): which builds it measures and what
each row holds (values, not timings: the ratios themselves are printed by the benchmark, never asserted)."""
from __future__ import annotations

import pytest

from vitdecomp import benchmark
from vitdecomp.errors import InputError
from vitdecomp.models import supported_families


def test_family_builds_small_and_full():
    fams = supported_families()
    small = dict((f, (m, kw)) for f, m, kw in benchmark.family_builds("all", "small"))
    assert small == fams, "small = the stand-ins' own small builds"
    full = {f: (m, kw) for f, m, kw in benchmark.family_builds(["swin", "eva_post_norm", "vit_relpos_respost"],
                                                                 "full")}
    assert full["swin"] == (fams["swin"][0], {})                     # sizes dropped: swin_tiny's defaults
    assert full["eva_post_norm"][1] == {"use_post_norm": True}       # structure kept
    assert full["vit_relpos_respost"][1] == {"fc_norm": True}
    with pytest.raises(InputError, match="unknown family.*'nope'.*supported_families"):
        benchmark.family_builds(["nope"])
    with pytest.raises(InputError, match="size must be"):
        benchmark.family_builds(["swin"], "huge")


def test_overhead_families_rows(monkeypatch):
    """One row per family: the figures of one overhead() call plus the family and the memory ratio; a
    family that fails gets its error and the run goes on."""
    calls = []

    def fake(model, batch, reps, device, dtype, heads, threads=None, seed=0, model_kwargs=None):
        calls.append((model, model_kwargs))
        if model == supported_families()["beit"][0]:
            raise RuntimeError("boom")
        return {"model": model, "ratio": 1.1, "cpu_ratio": 1.05, "plain_peak_mib": 10.0,
                "decompose_peak_mib": 12.5}

    monkeypatch.setattr(benchmark, "overhead", fake)
    seen = []
    rows = benchmark.overhead_families(["swin", "beit"], "small", batch=2, reps=1, progress=seen.append)
    assert [r["family"] for r in rows] == ["swin", "beit"] and seen == rows
    assert rows[0]["mem_ratio"] == pytest.approx(1.25)
    assert rows[1]["error"] == "RuntimeError: boom" and "ratio" not in rows[1]
    assert calls[0] == supported_families()["swin"]


def test_overhead_reports_cpu_time_ratio():
    """A tiny real run: the wall-clock and CPU-time figures are there, and the decomposition is exact."""
    m, kw = supported_families()["deit_distilled"]
    r = benchmark.overhead(m, batch=1, reps=1, device="cpu", threads=1, model_kwargs=kw)
    assert r["model_kwargs"] == kw and r["residual"] <= 1e-5
    assert r["plain_cpu_s"] > 0 and r["decompose_cpu_s"] > 0
    assert r["cpu_ratio"] == pytest.approx(r["decompose_cpu_s"] / r["plain_cpu_s"])
