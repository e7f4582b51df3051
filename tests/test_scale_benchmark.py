"""The scale benchmark's measurements on tiny synthetic stores (values, not timings): the bytes per image
it reports are the stores' own, and its passes run in both layouts."""
from __future__ import annotations

import numpy as np
import pytest

from vitdecomp import benchmark
from vitdecomp.store import open_store


@pytest.mark.slow                     # two spawned measuring processes per layout (≈ 30 s on 2 cores)
def test_scale_reports_each_layout(tmp_path):
    shape = {"d": 32, "blocks": 2, "heads": 2, "head_dim": 8}
    r = benchmark.scale([400], str(tmp_path), shape)
    (e,) = r["sizes"]
    assert e["rows"] == 400
    K_full = 1 + 2 * (2 + 1) + 1                      # embed, 2 blocks × (2 heads + mlp), bias
    for layout in ("full", "compact"):
        x = e[layout]
        assert {"scan", "textspan", "compattribute", "ablate", "peak_rss_mib", "bytes_per_image"} <= set(x)
        assert all(x[k] > 0 for k in ("scan", "textspan", "compattribute", "ablate", "peak_rss_mib"))
        # each pass has its own baseline: a raw scan of the columns it reads (ablate: two scans)
        assert all(x[f"scan_{k}"] > 0 for k in ("textspan", "compattribute", "ablate"))
        st = open_store(str(tmp_path / f"{layout}-400-32-2-2-8"))
        assert st.layout == layout and st.count() == 400
        assert x["bytes_per_image"] == st.nbytes() / 400
    # fp16 payload per row: readout + components; compact heads hold head_dim numbers instead of d
    full_payload = (K_full + 1) * 32 * 2
    compact_payload = full_payload - 4 * (32 - 8) * 2
    assert full_payload <= e["full"]["bytes_per_image"] < 1.5 * full_payload
    assert compact_payload <= e["compact"]["bytes_per_image"] < 1.5 * compact_payload
    # a rerun reuses the stores (same bytes) and measures again
    r2 = benchmark.scale([400], str(tmp_path), shape, passes=("scan", "textspan"))
    assert np.isclose(r2["sizes"][0]["compact"]["bytes_per_image"], e["compact"]["bytes_per_image"])
    assert "ablate" not in r2["sizes"][0]["compact"]
