"""The documentation is self-contained and its statements hold.

- every relative link in README.md and docs/*.md points to an existing file, and every ``#anchor``
  to a heading of that file (GitHub's slug rules: lower case, punctuation dropped, spaces → ``-``,
  repeated headings get ``-1``, ``-2`` …);
- no reference to the unshipped specification ("SPEC §n", "SPEC.md") in README.md, docs/,
  vitdecomp/ or jobs/;
- docs/method.md's rule for when ``bias`` is input-independent, checked on the toy ViT against a
  hand-written formula.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC_REF = re.compile(r"SPEC\s*§|SPEC\.md")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ------------------------------------------------------------------------------ markdown parsing
def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, inline code spans removed."""
    out, fence = [], None
    for no, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence):
                fence = None
            continue
        if fence is None:
            out.append((no, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text (rendered text: code, emphasis and link markup removed)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)           # links and images → their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)                  # emphasis markers
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            mark = m.group(1)
            fence = mark if fence is None else (None if mark[0] == fence[0] and len(mark) >= len(fence) else fence)
            continue
        h = HEADING.match(line) if fence is None else None
        if h:
            base = slug(h.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    out = []
    for no, line in prose_lines(text):
        out += [(no, m.group(1)) for m in LINK.finditer(line)]
        d = REF_DEF.match(line)
        if d:
            out.append((no, d.group(1)))
    return out


def dead_links(path: Path) -> list[str]:
    """Every relative link of the Markdown file ``path`` whose file or anchor does not exist."""
    text = path.read_text(encoding="utf-8")
    bad = []
    for no, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):              # http:, https:, mailto:, …
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{no}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no file {file_part!r})")
            continue
        if anchor:
            if dest.suffix.lower() != ".md" or dest.is_dir():
                bad.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    return bad


# ------------------------------------------------------------------------------ the checks
def test_slug_follows_github_rules():
    assert slug("How it works, and what it costs") == "how-it-works-and-what-it-costs"
    assert slug("Query: CompAttribute, retrieval, ablation") == "query-compattribute-retrieval-ablation"
    assert slug("When `bias` is input-independent") == "when-bias-is-input-independent"
    assert slug("The *two* conventions: centered and uniform") == "the-two-conventions-centered-and-uniform"
    assert slug("snake_case names") == "snake_case-names"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_checker_finds_dead_links(tmp_path):
    """The checker itself fails on a missing file, a missing anchor and an anchor into a non-Markdown file."""
    (tmp_path / "other.md").write_text("# Title\n## Some section\n")
    (tmp_path / "data.txt").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#some-section) [ok](#local) [web](https://example.com/x#y)\n"
                   "# Local\n"
                   "[bad](missing.md) [bad anchor](other.md#nope) [txt](data.txt#a) [self](#absent)\n"
                   "`[in code](missing2.md)`\n```\n[fenced](missing3.md)\n```\n[ref]: gone.md\n")
    bad = dead_links(doc)
    assert len(bad) == 5, bad
    assert any("missing.md" in b for b in bad) and any("#nope" in b for b in bad)
    assert any("data.txt#a" in b for b in bad) and any("#absent" in b for b in bad)
    assert any("gone.md" in b for b in bad)
    assert not any("missing2" in b or "missing3" in b for b in bad)


def test_docs_exist_and_readme_points_to_method():
    method = ROOT / "docs" / "method.md"
    assert method.is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/method.md" in readme
    for heading in ("the-decomposition", "the-two-conventions-centered-and-uniform",
                    "when-bias-is-input-independent", "compalign", "textspan", "compattribute",
                    "token-heatmaps-and-segmentation", "images-and-random-weights"):
        assert heading in anchors(method.read_text(encoding="utf-8")), heading


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_links(path):
    bad = dead_links(path)
    assert not bad, "dead references:\n" + "\n".join(bad)


def test_no_references_to_the_unshipped_spec():
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("vitdecomp", "jobs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix in (".py", ".md", ".txt", ".json", ".yaml", ".yml", ".html", ".toml", ".cfg")]
    hits = []
    for p in files:
        for no, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if SPEC_REF.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{no}: {line.strip()[:100]}")
    assert not hits, ("references to SPEC, which is not in the repository (link to docs/method.md instead):\n"
                      + "\n".join(hits))


# ------------------------------------------------------------------------------ the bias rule
@pytest.fixture(scope="module")
def toy_vit():
    """The toy ViT in float64 with random (non-zero) biases and norm affines, and two random images."""
    import torch

    import vitdecomp as vd
    from vitdecomp.toyworld.registry import TOY_VIT, register

    register()
    lm = vd.load_model(TOY_VIT)
    lm.model.double()
    g = torch.Generator().manual_seed(3)
    init_zero = all(float(p.abs().max()) == 0 for n, p in lm.model.named_parameters()
                    if n.endswith("attn.proj.bias") or n == "norm.bias")
    for n, p in lm.model.named_parameters():
        if n.endswith("bias") or "norm" in n:
            p.data.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return lm, x, init_zero


def _rows_differ(b) -> float:
    return float((b[0] - b[1]).norm() / b.norm(dim=-1).max())


def test_bias_rule_of_the_method_page(toy_vit):
    """docs/method.md, "When bias is input-independent": under centered, bias = γ⊙(b̃ − mean b̃)/σ(x) + β
    with b̃ = Σ_ℓ b_O,ℓ when heads are split (varies with σ(x)), = β without heads (constant), divided by
    ‖z‖ with normalize (varies); under uniform it is zero."""
    import torch

    import vitdecomp as vd

    lm, x, init_zero = toy_vit
    assert init_zero, "random-init timm ViTs have zero out-projection and norm biases (the page says so)"
    m = lm.model
    final = {}
    h = m.blocks[-1].register_forward_hook(lambda _, __, out: final.__setitem__("u", out[:, 0]))
    with torch.inference_mode():
        m(x)
    h.remove()
    u = final["u"]                                                       # [B, D] CLS of the last stream
    sigma = ((u - u.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + m.norm.eps).sqrt()
    b_sum = sum(blk.attn.proj.bias for blk in m.blocks)
    gamma, beta = m.norm.weight, m.norm.bias
    expected = gamma * (b_sum - b_sum.mean()) / sigma + beta             # hand-written, per image

    d = vd.decompose(lm, x, heads=True, convention="centered")
    assert d.residual().max() < 1e-10
    torch.testing.assert_close(d["bias"], expected, rtol=1e-10, atol=1e-12)
    assert _rows_differ(d["bias"]) > 1e-6                                # varies per image

    d = vd.decompose(lm, x, heads=False, convention="centered")
    torch.testing.assert_close(d["bias"], beta.expand(2, -1), rtol=1e-12, atol=1e-12)   # constant

    with torch.inference_mode():
        z = m.forward_head(m.forward_features(x), pre_logits=True)
    d = vd.decompose(lm, x, heads=False, convention="centered", normalize=True)
    torch.testing.assert_close(d["bias"], beta / z.norm(dim=-1, keepdim=True), rtol=1e-10, atol=1e-12)
    assert _rows_differ(d["bias"]) > 1e-6

    for heads in (True, False):
        for normalize in (False, True):
            d = vd.decompose(lm, x, heads=heads, convention="uniform", normalize=normalize)
            assert float(d["bias"].abs().max()) == 0.0
            assert d.residual().max() < 1e-10


# ------------------------------------------------------------------------------ numbers on the page
def test_method_page_states_the_codes_defaults():
    """The defaults and word lists docs/method.md states are the ones the code uses."""
    from vitdecomp.config import AlignConfig, MitigateConfig, RetrieveConfig, TextSpanConfig
    from vitdecomp.query.compattribute import DEFAULT_PROPERTIES, WATERBIRDS

    page = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    for name, words in {**DEFAULT_PROPERTIES, **WATERBIRDS}.items():
        assert f"| {name} | {', '.join(words)} |" in page, name
    a = AlignConfig()
    assert (a.lr, a.weight_decay, a.batch_size, a.init_std, a.lam, a.seed) == (3e-4, 1e-6, 32, 0.02, 1.0, 0)
    assert (a.val_fraction, a.max_epochs, a.patience, a.min_delta) == (0.1, 20, 3, 1e-4)
    for text in ("Adam, learning rate $3\\cdot 10^{-4}$, weight decay $10^{-6}$, batch 32",
                 "$A_k \\sim \\mathcal{N}(0, 0.02^2)$", "`--val-fraction` (0.1)", "`--max-epochs` (20)",
                 "`--patience` (3)"):
        assert text in page, text
    fields = {f.name: f.default for f in dataclasses.fields(TextSpanConfig)}
    assert (fields["rank"], fields["texts_per_head"], fields["last_layers"]) == (80, 10, 4)
    assert "$r = \\min(80, d)$" in page and "$m = 10$" in page and "last 4" in page
    assert {f.name: f.default for f in dataclasses.fields(MitigateConfig)}["k"] == 10
    assert "top $k$ (default 10" in page
    assert {f.name: f.default for f in dataclasses.fields(RetrieveConfig)}["index_threshold"] == 100_000
    assert "Below 100,000 rows" in page


README_REF = re.compile(r"README\s+“([^”]+)”")


def test_readme_section_references_in_code_name_existing_headings():
    """Help texts, report summaries and comments cite README sections as README “Title”: the title must
    begin a heading of README.md (“Query” names "Query: CompAttribute, …")."""
    headings = [HEADING.match(line).group(2) for _, line in prose_lines((ROOT / "README.md").read_text())
                if HEADING.match(line)]
    dead = []
    for path in sorted([*(ROOT / "vitdecomp").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for title in README_REF.findall(line):
                if not any(h.startswith(title) for h in headings):
                    dead.append(f"{path.relative_to(ROOT)}:{n}: README “{title}”")
    assert not dead, "README sections that do not exist:\n" + "\n".join(dead)
