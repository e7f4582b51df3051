"""Interpretability scores (vitdecomp.query.interpretability): labels, association and entanglement on
planted TextSpan texts, checked against counts done by hand; the subcommand end to end."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from vitdecomp.cli import main
from vitdecomp.errors import InputError
from vitdecomp.query.interpretability import matches, score_heads, texts_from_table, vocabularies

PROPS = {"color": ["blue color", "red color", "green color"],
         "location": ["sea", "beach", "forest"],
         "pattern": ["spotted pattern", "polka dot pattern", "striped pattern"]}

# planted heads: h0 pure colour, h1 colour+location (mixed), h2 pure location, h3 nothing, h4 pattern
HEADS = {
    "blocks.3.attn.head.0": ["a blue car", "red paint", "Green leaves", "a cat"],
    "blocks.3.attn.head.1": ["a red boat at sea", "a beach", "forest path", "blue sky"],
    "blocks.3.attn.head.2": ["stormy sea", "sandy beach", "a dark forest", "a dog"],
    "blocks.3.attn.head.3": ["a cat", "a dog", "a chair", "a table"],
    "blocks.3.attn.head.4": ["polka dot dress", "a striped shirt", "dotted line", "red dots"],
}


def test_vocabulary_drops_shared_words_and_matches_whole_words():
    v = vocabularies(PROPS)
    assert v["color"] == [("blue",), ("red",), ("green",)]
    assert v["pattern"] == [("spotted",), ("polka", "dot"), ("striped",)]     # 'pattern' is shared: dropped
    assert v["location"] == [("sea",), ("beach",), ("forest",)]               # nothing shared: kept whole
    assert matches("A Polka-Dot dress by the SEA", v) == ["location", "pattern"]
    assert matches("seashell", v) == [] and matches("dotted", v) == []           # whole words only
    v2 = vocabularies(PROPS, {"pattern": ["dotted", "dots"], "animal": ["cat", "dog"]})
    assert v2["pattern"] == [("dotted",), ("dots",)] and v2["animal"] == [("cat",), ("dog",)]
    with pytest.raises(InputError, match="no usable terms"):
        vocabularies(PROPS, {"x": ["!!"]})


def test_scores_on_planted_heads_match_hand_counts():
    rows, s = score_heads(HEADS, vocabularies(PROPS), min_share=0.5)
    by = {r["component"]: r for r in rows}
    # hand counts (color, location, pattern) per head:
    # h0 (3,0,0) → color, a=3/4;  h1 (2,3,0) → location, a=3/4, mixed (2≥2, 3≥2)
    # h2 (0,3,0) → location, a=3/4
    # h3 (0,0,0) → unlabelled;    h4 (1,0,2) → pattern, a=2/4 (polka dot + striped; 'dotted'/'dots' no match)
    assert [by[h]["label"] for h in HEADS] == ["color", "location", "location", None, "pattern"]
    assert [by[h]["association"] for h in HEADS] == [0.75, 0.75, 0.75, None, 0.5]
    assert [by[h]["mixed"] for h in HEADS] == [False, True, False, False, False]
    assert (by["blocks.3.attn.head.1"]["n_color"], by["blocks.3.attn.head.1"]["n_location"]) == (2, 3)
    assert s["heads"] == 5 and s["labelled"] == 4 and s["coverage"] == 0.8
    assert s["association_score"] == pytest.approx((0.75 + 0.75 + 0.75 + 0.5) / 4)
    # location is the label of two heads (h1, h2): 2 of the 4 labelled heads are entangled
    assert s["entanglement_score"] == pytest.approx(2 / 4)
    assert s["mixed_fraction"] == pytest.approx(1 / 4)
    assert s["per_property"] == {"color": 1, "location": 2, "pattern": 1}
    # the first two texts only: h1 → (1 colour, 2 location) → location, association 2/2
    rows2, s2 = score_heads(HEADS, vocabularies(PROPS), texts_per_head=2)
    assert {r["component"]: r["association"] for r in rows2}["blocks.3.attn.head.1"] == 1.0
    assert s2["entanglement_score"] == pytest.approx(2 / 4)
    # ties go to the property matched by the earlier text, then to the property order
    tie = {"x": ["a red cat", "the sea"], "y": ["the sea", "a red cat"], "z": ["red sea"]}
    assert [r["label"] for r in score_heads(tie, vocabularies(PROPS))[0]] == ["color", "location", "color"]
    with pytest.raises(InputError, match="min_share"):
        score_heads(HEADS, vocabularies(PROPS), min_share=0)


def test_textspan_table_order_and_missing_columns():
    t = pa.table({"component": ["a", "a", "b"], "rank": [1, 0, 0], "text": ["second", "first", "x"]})
    assert texts_from_table(t) == {"a": ["first", "second"], "b": ["x"]}
    with pytest.raises(InputError, match="fit textspan"):
        texts_from_table(pa.table({"component": ["a"]}))


def test_interpretability_subcommand(tmp_path, capsys):
    rows = [{"component": h, "rank": i, "text": t, "text_index": i, "variance_explained": 0.1, "cumulative": 0.1}
            for h, ts in HEADS.items() for i, t in enumerate(ts)]
    fit = tmp_path / "fit"
    fit.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), fit / "textspan.parquet")
    props = tmp_path / "props.yaml"
    props.write_text(yaml.safe_dump(PROPS))
    out = tmp_path / "q"
    rc = main(["query", "interpretability", "--textspan", str(fit), "--out", str(out), "--properties", str(props),
               "--min-share", "0.5"])
    assert rc == 0
    s = json.loads((out / "interpretability.json").read_text())
    # the default properties come too: 'cat'/'dog' make h3 an animal head; location is still shared by two
    assert s["labelled"] == 5 and s["entanglement_score"] == pytest.approx(2 / 5)
    t = pq.read_table(out / "interpretability.parquet").to_pylist()
    labels = {r["component"]: r["label"] for r in t}
    assert labels["blocks.3.attn.head.2"] == "location" and labels["blocks.3.attn.head.3"] == "animal"
    assert (out / "interpretability.png").exists() and "Interpretability" in (out / "report.html").read_text()
    assert "entanglement score 0.4000" in capsys.readouterr().out
    rc = main(["query", "interpretability", "--textspan", str(tmp_path / "nofit"), "--out", str(out)])
    assert rc == 2 and "vitdecomp fit textspan" in capsys.readouterr().err
