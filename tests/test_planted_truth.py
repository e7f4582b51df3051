"""The toy world's planted truths, asserted (fixed seeds, the shipped models, a mid-size world, no Ray):

- mean-ablating the top 5 components of the signed ranking (chosen on validation) raises the
  classifier's test worst-group accuracy by at least 5 points;
- the component that ranking puts first is a background component in the planted sense: mean-ablating
  it alone raises the test worst-group accuracy;
- the tiny CLIP's head that CompAttribute ranks first for the background on its own decomposition (each
  score option: specific, correlation, variance-share) has a background word as its first TextSpan text
  (strict xfail: it does not hold for the shipped tiny CLIP with any score; see the test's comment).
"""
from __future__ import annotations

import numpy as np
import pytest

import vitdecomp as vd
from vitdecomp.toyworld.generate import SCENES, WorldConfig, generate, vocabulary_pool
from vitdecomp.toyworld.train import TrainConfig, shipped_index, shipped_models

pytestmark = pytest.mark.skipif(shipped_index() is None, reason="no shipped toy-world weights")
WORLD = WorldConfig(n_train=40, n_val=400, n_test=400)            # the shipped models' world distribution
BACKGROUND_WORDS = {"water", "land", *(s for fam in SCENES.values() for s in fam)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    generate(str(root), WORLD)
    m = shipped_models(WORLD, TrainConfig())
    return {"dir": str(root), "clf": vd.load_model(m["classifier"]["model"], checkpoint=m["classifier"]["checkpoint"]),
            "clip": vd.load_model(m["clip"]["model"], checkpoint=m["clip"]["checkpoint"])}


def test_signed_mitigation_raises_worst_group_accuracy_by_5_points(world):
    from vitdecomp.benchmark import spurious_ablation

    r = spurious_ablation(world["clf"], world["dir"], ks=(5,))
    before, after = r["before"]["worst"], r["top5"]["worst"]
    assert after - before >= 0.05, (before, after, r["top5"]["ablated"])
    # the control: five random components do not do it
    assert r["random5"]["worst"] - before < after - before


def test_the_first_ranked_component_is_a_background_component(world):
    from vitdecomp.benchmark import spurious_ablation

    r = spurious_ablation(world["clf"], world["dir"], ks=(1,))
    assert r["top1"]["worst"] > r["before"]["worst"], (r["top1"], r["before"])


@pytest.fixture(scope="module")
def clip_own(world):
    """The tiny CLIP's own decomposition of the test split, its component names and the pool's embeddings."""
    from vitdecomp.benchmark import _decompose_split
    from vitdecomp.fit.text import encode_texts

    clip = world["clip"]
    contrib, _ = _decompose_split(clip, world["dir"], "test")
    return {"contrib": contrib, "names": [c.name for c in vd.components_for(clip)],
            "pool": vocabulary_pool(), "pool_emb": encode_texts(clip, vocabulary_pool())}


# Measured with the shipped tiny CLIP on the default world's test split (README, the toy world's
# CompAttribute diagnosis; `benchmark toyworld`): the head each score ranks first for the background and TextSpan's first text for it — specific:
# resblocks.0.attn.head.1 'a dotted circle'; correlation: resblocks.3.attn.head.2 'a small triangle';
# variance-share: resblocks.2.attn.head.1 'a blue square' (its second text is 'a shape on forest'). Only
# resblocks.3.attn.head.3 of the 16 heads names a scene first, and no score ranks it first.
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="does not hold for the shipped tiny CLIP with any CompAttribute score: its "
                   "text tower barely separates the properties (README, the toy world's CompAttribute diagnosis); "
                   "making it hold means retraining the tiny CLIP")
@pytest.mark.parametrize("score", ["specific", "correlation", "variance-share"])
def test_the_clips_background_head_names_a_background_first(world, clip_own, score):
    from vitdecomp.fit.text import encode_texts
    from vitdecomp.fit.textspan import Moments, textspan_one
    from vitdecomp.query.compattribute import Sums, basis, scores
    from vitdecomp.toyworld.demo import WORLD_PROPERTIES

    clip, contrib, names = world["clip"], clip_own["contrib"], clip_own["names"]
    props = list(WORLD_PROPERTIES)
    qs = [basis(encode_texts(clip, WORLD_PROPERTIES[p])) for p in props]
    sc = scores(Sums.of(contrib.astype(np.float64), np.concatenate(qs)), [len(q) for q in qs], score)
    bg = props.index("world background")
    heads = [k for k, n in enumerate(names) if ".head." in n]
    top = max(heads, key=lambda k: sc[k, bg])
    pool = clip_own["pool"]
    mo = Moments.of(contrib[:, top:top + 1].astype(np.float64))
    first = pool[textspan_one(mo.n, mo.mean[0], mo.xtx[0], clip_own["pool_emb"], m=1, rank=32).picks[0]]
    assert set(first.split()) & BACKGROUND_WORDS, (names[top], first)
