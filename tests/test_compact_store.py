"""The compact store layout (README “Store layout”): exact round trips for every family, fallbacks,
and the refusals (corrupted basis, unknown layout, newer format)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vitdecomp as vd
from conftest import images_for, model
from vitdecomp.config import DecomposeOptions
from vitdecomp.models import TEST_MODELS
from vitdecomp.store import Store, StoreError, open_store
from vitdecomp.store.compact import LayoutError, build_manifest, derive_layout

FAST = [m for m in TEST_MODELS if "vit_base" not in m]       # stand-ins whose default build is small
SLOW = [pytest.param(m, marks=pytest.mark.slow) for m in TEST_MODELS if "vit_base" in m]


def rel_err(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per (image, component) relative error; components that are exactly zero compare absolutely."""
    den = np.linalg.norm(ref, axis=-1)
    return np.linalg.norm(got - ref, axis=-1) / np.where(den > 0, den, 1.0)


def write(tmp_path, lm, dec, layout: str, dtype: str, convention: str, name: str, blocks=None) -> Store:
    m, basis = build_manifest(lm, options=DecomposeOptions(convention=convention, dtype=dtype, blocks=blocks),
                              layout=layout)
    st = Store.create(tmp_path / name, m, basis=basis)
    st.append(dec, [f"i{k}" for k in range(dec.readout.shape[0])])
    return open_store(str(tmp_path / name))


@pytest.mark.parametrize("convention", ["centered", "uniform"])
@pytest.mark.parametrize("name", FAST + SLOW)
def test_round_trip_every_family(tmp_path, name, convention):
    lm = model(name)
    x = images_for(lm, batch=3)
    dec = vd.decompose(lm, x, convention=convention)
    ref = dec.contributions.numpy()
    st = write(tmp_path, lm, dec, "compact", "fp32", convention, "c")
    heads = [c for c in st.components if c.kind == "head"]
    widths = st.typed_manifest.widths()
    # every head is stored as coordinates (rank ≤ head_dim + 2), everything else full
    assert st.layout == "compact" and sorted(widths) == sorted(h.name for h in heads)
    assert all(w <= st.manifest["d"] // 2 for w in widths.values())
    assert (st.manifest["compact"]["offset_column"]) == (convention == "uniform")
    b = next(st.iter_batches(batch_size=10))
    assert b.ids == ["i0", "i1", "i2"] and b.names == dec.names
    assert rel_err(b.contributions, ref).max() <= 1e-5
    np.testing.assert_allclose(b.readout, dec.readout.numpy(), rtol=0, atol=1e-6)
    # read() gives d-vectors too; coefficients=True the stored coordinates, ‖u‖ = ‖c − w·O‖
    t = st.read(columns=["image_id", "c_" + heads[-1].name.replace(".", "_")])
    col = np.stack(t.column(1).to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(col, ref[:, dec.index(heads[-1].name)], rtol=0, atol=1e-5 * np.abs(ref).max())
    cb = next(st.iter_batches(batch_size=10, coefficients=True))
    h = heads[0].name
    w = cb.layout.weight(h)
    shifted = ref[:, dec.index(h)] - (w * dec.offset.numpy() if w else 0)
    np.testing.assert_allclose(np.linalg.norm(cb.coefficients[h], axis=1), np.linalg.norm(shifted, axis=1), rtol=1e-5)


def test_fp16_error_and_bytes_vs_full(tmp_path):
    """fp16 coordinates keep the error of fp16 vectors (≤ 1.5×); the rows are smaller."""
    lm = model("open_clip:ViT-S-16")
    dec = vd.decompose(lm, images_for(lm, batch=4))
    ref = dec.contributions.numpy()
    comp = write(tmp_path, lm, dec, "compact", "fp16", "centered", "c")
    full = write(tmp_path, lm, dec, "full", "fp16", "centered", "f")
    assert full.layout == "full" and "compact" not in full.manifest
    e_c = rel_err(next(comp.iter_batches()).contributions, ref)
    e_f = rel_err(next(full.iter_batches()).contributions, ref)
    heads = [k for k, c in enumerate(dec.components) if c.kind == "head"]
    assert e_c[:, heads].max() <= 1.5 * e_f[:, heads].max()
    assert e_c.max() <= 1.5 * e_f.max()
    assert comp.nbytes() < 0.5 * full.nbytes()


def test_offset_is_the_chain_offset():
    """Decomposition.offset under the uniform convention equals the final LayerNorm's offset β − γ·μ/σ."""
    lm = model("timm:deit_tiny_patch16_224")
    x = images_for(lm, batch=2)
    dec = vd.decompose(lm, x, convention="uniform")
    # independent: the final LayerNorm's offset is β − γ·μ/σ of the pooled final stream
    net = lm.model
    seen = {}
    hook = net.norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", inp[0]))
    with torch.inference_mode():
        net.forward_features(x)
    hook.remove()
    feats = seen["x"][:, 0]                                  # the pooled (CLS) stream entering the final norm
    mu, var = feats.mean(-1, keepdim=True), feats.var(-1, unbiased=False, keepdim=True)
    sigma = (var + net.norm.eps).sqrt()
    want = net.norm.bias - net.norm.weight * mu / sigma
    torch.testing.assert_close(dec.offset, want.detach(), rtol=1e-5, atol=1e-5)


def test_spatial_family_falls_back_to_full(caplog):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=48, depths=(1, 1, 2, 1),
                          num_heads=(2, 2, 4, 4)).eval()
    comps = vd.components_for(m)
    with caplog.at_level("INFO"):
        layout, report = derive_layout(m, comps)
    assert layout is None and set(report["full"]) == {c.name for c in comps}
    assert "per-position readout" in caplog.text


def test_eva_subnorm_heads_are_compact():
    """EVA-02 heads pass through a sub-LayerNorm (its centring adds a direction): still exact."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=3, img_size=56).eval()
    comps = vd.components_for(m)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    for conv in ("centered", "uniform"):
        layout, report = derive_layout(m, comps, conv, images=x)
        assert layout is not None and len(layout.bases) == sum(c.kind == "head" for c in comps), report["full"]
        dec = vd.decompose(m, torch.randn(2, 3, 56, 56), convention=conv)
        errs = layout.residual(dec.names, dec.contributions.double().numpy(), dec.offset.double().numpy())
        assert max(errs.values()) <= 1e-5


@pytest.fixture()
def compact_store(tmp_path):
    lm = model("timm:deit_tiny_patch16_224")
    dec = vd.decompose(lm, images_for(lm, batch=2), blocks=[11])
    return write(tmp_path, lm, dec, "compact", "fp16", "centered", "s", blocks="11")


def test_corrupted_basis_is_refused(compact_store):
    path = compact_store.path + "/basis.safetensors"
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    st = open_store(compact_store.uri)
    with pytest.raises(LayoutError, match="SHA-256.*restore it from a backup"):
        next(st.iter_batches())
    assert st.read(columns=["image_id"]).num_rows == 2          # ids (no basis needed) still read


def test_missing_basis_is_refused(compact_store):
    import os

    os.remove(compact_store.path + "/basis.safetensors")
    with pytest.raises(StoreError, match="basis file basis.safetensors is missing"):
        next(open_store(compact_store.uri).iter_batches())


@pytest.mark.parametrize("change, match", [({"layout": "compact2", "min_reader": "9.0"},
                                            "store layout compact2 .*needs vitdecomp ≥ 9.0"),
                                           ({"format_version": 3, "min_reader": "1.4"},
                                            "store layout compact \\(format 3\\) needs vitdecomp ≥ 1.4")])
def test_unknown_layout_or_newer_format_refused(compact_store, change, match):
    path = compact_store.path + "/manifest.json"
    m = json.load(open(path))
    m.update(change)
    json.dump(m, open(path, "w"))
    with pytest.raises(LayoutError, match=match):
        open_store(compact_store.uri)


def test_append_needs_the_offset_for_uniform(tmp_path):
    lm = model("timm:deit_tiny_patch16_224")
    dec = vd.decompose(lm, images_for(lm, batch=2), blocks=[11], convention="uniform")
    m, basis = build_manifest(lm, options=DecomposeOptions(convention="uniform", blocks="11"))
    st = Store.create(tmp_path / "u", m, basis=basis)
    dec.offset = None
    with pytest.raises(StoreError, match="chain offset"):
        st.append(dec, ["a", "b"])
    with pytest.raises(StoreError, match="basis file"):
        Store.create(tmp_path / "v", m)


def test_synthetic_layouts_hold_the_same_contributions(tmp_path):
    from vitdecomp.store.synthetic import planted_directions, write_synthetic_store

    kw = dict(d=64, blocks=2, heads=3, head_dim=8, seed=3, batch_rows=300)
    a = write_synthetic_store(str(tmp_path / "c"), 700, layout="compact", **kw)
    b = write_synthetic_store(str(tmp_path / "f"), 700, layout="full", **kw)
    assert a.count() == b.count() == 700 and a.layout == "compact" and b.layout == "full"
    ca = np.concatenate([x.contributions for x in a.iter_batches(batch_size=256)])
    cb = np.concatenate([x.contributions for x in b.iter_batches(batch_size=256)])
    np.testing.assert_allclose(ca, cb, rtol=0, atol=2e-3)
    ra = np.concatenate([x.readout for x in a.iter_batches(batch_size=256)])
    np.testing.assert_allclose(ca.sum(1), ra, rtol=0, atol=2e-2)
    # a planted head carries its property direction: its contributions correlate with it
    dirs = planted_directions(a)
    planted = a.manifest["source"]["planted"]
    for head, p in planted.items():
        k = a.names.index(head)
        share = np.linalg.norm(ca[:, k] @ dirs[p]) / np.linalg.norm(ca[:, k])
        assert share > 0.9
    assert a.nbytes() < b.nbytes()


def test_existing_store_keeps_its_layout(compact_store, tmp_path, caplog):
    """A rerun with another --layout resumes in the store's own layout (a logged no-op)."""
    from vitdecomp.config import DecomposeConfig
    from vitdecomp.store.compact import layout_for_run

    cfg = DecomposeConfig(model="timm:deit_tiny_patch16_224", input="x", output=compact_store.uri, layout="full",
                          blocks="11")
    with caplog.at_level("WARNING"):
        fields, basis = layout_for_run(cfg, compact_store, compact_store.components)
    assert basis is None and fields["layout"] == "compact" and fields["compact"] == compact_store.manifest["compact"]
    assert "keeps that layout" in caplog.text
    # a new store gets what was asked for: full → no layout fields, no basis file
    new = Store(str(tmp_path / "new"))
    assert layout_for_run(cfg, new, compact_store.components) == ({}, None)
