"""The zoo sweep (vitdecomp/zoo.py, ``benchmark zoo``): classification of single models, the worker pool,
the summary and the README table; a slow sweep over a deterministic sample of the zoo."""
from __future__ import annotations

import pytest

import vitdecomp as vd
from vitdecomp import zoo
from vitdecomp.errors import UnsupportedModuleError

TINY = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)


def test_exact_model_is_exact():
    r = zoo.check_model("timm:deit_tiny_patch16_224", "deit", candidates=[TINY])
    assert r.status == "exact", r.message
    assert r.kwargs == TINY and 0 < r.params < 1_000_000
    assert r.residual <= zoo.TOL and r.readout_error <= zoo.TOL


def test_unsupported_model_is_refused_with_its_message():
    """A module without a rule (an attention subclass with its own forward): UnsupportedModuleError,
    its message (path, type) kept."""
    from timm.layers import Attention

    class GatedAttention(Attention):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs) * 0.5

    def loader(name, **kw):
        lm = vd.load_model(name, **kw)
        old = lm.model.blocks[1].attn
        new = GatedAttention(old.qkv.in_features, num_heads=old.num_heads, qkv_bias=True)
        new.load_state_dict(old.state_dict())
        lm.model.blocks[1].attn = new.eval()
        return lm

    r = zoo.check_model("timm:deit_tiny_patch16_224", "deit", candidates=[TINY], loader=loader)
    assert r.status == "refused", r.message
    assert "blocks.1.attn" in r.message and "GatedAttention" in r.message


def test_upstream_failure_falls_back_then_is_build_failed():
    calls = []

    def loader(name, **kw):
        calls.append(kw)
        if kw.get("depth") == 2:
            raise TypeError("__init__() got an unexpected keyword argument 'depth'")
        return vd.load_model(name, **kw)

    r = zoo.check_model("timm:deit_tiny_patch16_224", candidates=[dict(depth=2), dict(depth=1, img_size=32)],
                        loader=loader)
    assert r.status == "exact" and r.kwargs == dict(depth=1, img_size=32) and len(calls) == 2

    def broken(name, **kw):
        raise RuntimeError("upstream constructor bug")

    r = zoo.check_model("timm:deit_tiny_patch16_224", candidates=[{}, dict(depth=1)], loader=broken)
    assert r.status == "build_failed" and "upstream constructor bug" in r.message


def test_parameter_budget_is_too_large():
    r = zoo.check_model("timm:deit_tiny_patch16_224", candidates=[dict(depth=1, img_size=32)], max_params=1000)
    assert r.status == "too_large" and r.params > 1000


def test_foreign_exception_and_wrong_answer_are_bugs(monkeypatch):
    """Whatever decompose does wrong is caught: another exception is ``foreign``, a readout that is not
    the model's own (or contributions that do not sum to it) is ``wrong``."""
    import vitdecomp.engine as engine

    real = engine.decompose

    def shifted(lm, x, **kw):
        d = real(lm, x, **kw)
        d.readout = d.readout + 1e-3
        return d

    def raising(lm, x, **kw):
        raise ValueError("boom")

    def unsupported(lm, x, **kw):
        raise UnsupportedModuleError("blocks.0.attn: no attention rule for Foo; register one")

    got = {}
    for label, fn in (("wrong", shifted), ("foreign", raising), ("refused", unsupported)):
        monkeypatch.setattr(engine, "decompose", fn)
        got[label] = zoo.check_model("timm:deit_tiny_patch16_224", candidates=[TINY])
    assert {k: r.status for k, r in got.items()} == {"wrong": "wrong", "foreign": "foreign", "refused": "refused"}
    assert got["foreign"].message == "ValueError: boom"
    assert "readout error" in got["wrong"].message and got["wrong"].readout_error > zoo.TOL
    assert got["refused"].message.startswith("blocks.0.attn: no attention rule for Foo")


def test_summary_and_readme_table():
    R = zoo.ZooResult
    rs = [R("timm:a", "vision_transformer", "exact"), R("timm:b", "vision_transformer", "refused", "x"),
          R("timm:c", "swin_transformer", "exact"), R("timm:d", "swin_transformer", "build_failed"),
          R("timm:e", "xcit", "foreign", "KeyError: 3"), R("open_clip:F", "open_clip", "exact")]
    s = zoo.summarize(rs)
    assert s["families"]["vision_transformer"] == {"exact": 1, "refused": 1}
    assert s["coverage"] == pytest.approx(2 / 4) and s["coverage_all"] == pytest.approx(2 / 5)
    assert s["open_clip_coverage"] == 1.0 and [b["name"] for b in s["bugs"]] == ["timm:e"]
    doc = zoo.to_json(rs)
    assert zoo.from_json(doc) == rs
    table = zoo.readme_table(doc)
    assert "| swin_transformer | 1/2 | 0 | 1 | 0 | `c` |" in table
    assert "| xcit | 0/1 | 0 | 0 | 1 |  |" in table
    assert table.splitlines()[-1].startswith("| open_clip | 1/1")
    text = f"intro\n{zoo.README_BEGIN}\nold\n{zoo.README_END}\nrest\n"
    new = zoo.replace_readme_table(text, table)
    assert new.startswith("intro\n") and new.endswith("\nrest\n") and "old" not in new and table in new
    assert zoo.replace_readme_table(new, table) == new
    with pytest.raises(vd.InputError, match="zoo table markers"):
        zoo.replace_readme_table("no markers", table)


def test_architectures_are_named_without_tags():
    archs = zoo.architectures()
    assert "timm:deit_tiny_patch16_224" in archs and archs["timm:deit_tiny_patch16_224"] == "deit"
    assert "open_clip:ViT-B-16" in archs and not any("." in n.split(":", 1)[1] for n in archs if n.startswith("timm:"))
    assert "timm:resnet50" not in archs                      # not a transformer family


def test_sweep_times_out_without_hanging():
    """A model that does not finish in time is ``timeout``; its worker is killed and the sweep goes on."""
    archs = {"timm:deit_tiny_patch16_224": "deit", "timm:deit_small_patch16_224": "deit"}
    rs = zoo.sweep(archs, workers=1, timeout_s=0.5)
    assert [(r.name, r.status) for r in rs] == [(n, "timeout") for n in archs]
    assert "no result within" in rs[0].message


@pytest.mark.slow
def test_sweep_in_worker_processes():
    """Two models through one worker process: results in order, classified as in-process."""
    archs = {"timm:deit_tiny_patch16_224": "deit", "timm:levit_128s": "levit"}
    rs = zoo.sweep(archs, workers=1, timeout_s=300)
    assert [r.name for r in rs] == list(archs)
    assert rs[0].status == "exact" and rs[1].status in ("exact", "refused"), [(r.status, r.message) for r in rs]
    assert rs[0].kwargs == zoo.shrink_candidates("timm:deit_tiny_patch16_224")[0]


def sample(step: int = 15) -> dict:
    """Every ``step``-th swept architecture (name order): a deterministic sample of the zoo."""
    archs = zoo.architectures()
    return dict(list(archs.items())[::step])


@pytest.mark.slow
def test_zoo_sample_has_no_bugs():
    """A deterministic sample of the sweep (the whole takes about 45 min on 2 busy cores: ``python
    jobs/benchmark.py zoo``): every model decomposes exactly or is refused with UnsupportedModuleError,
    or does not build upstream / within the budget; never a foreign exception or a wrong answer."""
    rs = zoo.sweep(sample(), workers=2, timeout_s=600)
    bugs = [(r.name, r.status, r.message[:300]) for r in rs if r.status in zoo.BUGS]
    assert not bugs, bugs
    assert any(r.status == "exact" for r in rs) and all(r.message for r in rs if r.status == "refused")
