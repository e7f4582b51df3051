"""The query report (vitdecomp.report): sidecars → one self-contained static HTML page.

Unit tests parse the written HTML; the browser tests render it in Debian's headless Chromium
(/usr/bin/chromium, skipped with a reason when it is not installed) and check there that every
<img> decoded, that every link target exists (plot links load as images), and that the page is
not blank. Each browser check is also run on a broken page to show it fails.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitdecomp.errors import InputError
from vitdecomp.query.report import ReportError, format_value, write_report, write_section

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


# --------------------------------------------------------------------------------------------- fixtures
def _png_matplotlib(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [0.7, 0.6, 0.4])
    fig.savefig(path, dpi=50)
    plt.close(fig)


def make_out(root: Path) -> Path:
    """An output directory with two sections (written in reverse order), two plots, two tables."""
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    _png_matplotlib(out / "ablation.png")
    Image.new("RGB", (37, 23), (10, 200, 30)).save(out / "sub" / "sheet 1.png")
    pq.write_table(pa.table({"component": [f"blocks.{i}.mlp" for i in range(100)],
                             "score": np.linspace(-1, 1, 100), "n": np.arange(100),
                             "vec": [list(np.arange(8, dtype=np.float32) * i) for i in range(100)]}),
                   out / "ablation.parquet")
    pq.write_table(pa.table({"rank": [0, 1, 2], "image_id": ["a.png", HOSTILE, "c.png"],
                             "score": [0.9, 0.5, None]}), out / "sub" / "retrieval.parquet")
    write_section(str(out), "zeta", "Retrieval", order=5, summary=f"probe {HOSTILE}",
                  facts={HOSTILE: HOSTILE, "top components": np.array([3, 1, 2]), "n": np.int64(7)},
                  images=[(str(out / "sub" / "sheet 1.png"), f"sheet {HOSTILE}")],
                  tables=[{"path": "sub/retrieval.parquet", "caption": "ranked images"}])
    write_section(str(out), "ablation", "Mean-ablation curves", order=30, summary="Accuracy as components are ablated.",
                  facts={"baseline accuracy": np.float32(0.71), "store": "/stores/x"},
                  images=["ablation.png"],
                  tables=[{"path": "ablation.parquet", "caption": "curve", "max_rows": 5}])
    return out


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.stack, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "a":
            self.links.append(a.get("href"))
            self.stack.append(a.get("href"))
        elif tag == "img":
            self.imgs.append((a.get("src"), self.stack[-1] if self.stack else None))

    def handle_endtag(self, tag):
        if tag == "a" and self.stack:
            self.stack.pop()


def parse(html_text: str) -> _Collect:
    c = _Collect()
    c.feed(html_text)
    return c


# --------------------------------------------------------------------------------------------- unit tests
def test_every_image_embedded_and_linked_every_table_linked(tmp_path):
    out = make_out(tmp_path)
    path = write_report(str(out), title="My run")
    assert path == str(out / "report.html")
    text = Path(path).read_text(encoding="utf-8")
    c = parse(text)
    # every image: a data: URI holding exactly the file's bytes, inside a link to that file
    expected = {"ablation.png", "sub/sheet 1.png"}
    assert len(c.imgs) == len(expected)
    for src, href in c.imgs:
        assert src.startswith("data:image/png;base64,")
        rel = urllib.parse.unquote(href)
        assert rel in expected
        assert base64.b64decode(src.split(",", 1)[1]) == (out / rel).read_bytes()
    assert {urllib.parse.unquote(h) for _, h in c.imgs} == expected
    # every table: a link to its Parquet file and its row count
    hrefs = {urllib.parse.unquote(h) for h in c.links}
    assert {"ablation.parquet", "sub/retrieval.parquet"} <= hrefs
    assert "first 5 of 100 rows" in text and "3 rows" in text
    assert text.count("<tr>") == 1 + 5 + 1 + 3                          # header + max_rows, header + all
    assert "8 values: min 0, mean 3.5, max 7" in text                  # number vectors summarised
    assert "—" in text                                                  # null cell
    # sections by order (5 before 30), table of contents, header, no scripts and no network references
    assert text.index("Retrieval") < text.index("Mean-ablation curves")
    assert "#sec-zeta" in hrefs and "#sec-ablation" in hrefs and 'id="sec-zeta"' in text
    assert "<title>My run</title>" in text and "vitdecomp 0.1.0" in text and " UTC" in text
    assert "script" not in c.tags and "link" not in c.tags and "iframe" not in c.tags
    for h in c.links:
        assert not urllib.parse.urlparse(h).scheme and not h.startswith("//"), h
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    # facts: a definition list; numpy values converted
    assert "<dt>baseline accuracy</dt><dd>0.71</dd>" in text and "<dd>[3, 1, 2]</dd>" in text


def test_hostile_text_is_escaped(tmp_path):
    out = make_out(tmp_path)
    text = Path(write_report(str(out), title=HOSTILE)).read_text(encoding="utf-8")
    assert "<script" not in text and "<b>bold" not in text
    esc = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
    # title (x2), summary, fact key and value, caption (figcaption and alt), table cell
    assert text.count(esc) >= 7
    assert "script" not in parse(text).tags


def test_section_sidecar_contents(tmp_path):
    out = make_out(tmp_path)
    doc = json.loads((out / "zeta.section.json").read_text())
    assert doc["images"] == [{"path": "sub/sheet 1.png", "caption": f"sheet {HOSTILE}"}]   # absolute → relative
    assert doc["facts"]["top components"] == [3, 1, 2] and doc["facts"]["n"] == 7
    assert doc["order"] == 5 and doc["tables"][0]["path"] == "sub/retrieval.parquet"


def _sidecar(out: Path, **kw) -> Path:
    doc = {"name": "s", "title": "S", "order": 1, "summary": "", "facts": {}, "images": [], "tables": []}
    doc.update(kw)
    p = out / f"{doc.get('name', 's')}.section.json"
    p.write_text(json.dumps(doc))
    return p


def test_bad_sidecars_raise_clear_errors(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ReportError, match="no \\*.section.json"):
        write_report(str(out))
    with pytest.raises(ReportError, match="does not exist"):
        write_report(str(tmp_path / "nowhere"))
    # a missing image: the error names the sidecar and the file
    sc = _sidecar(out, images=[{"path": "gone.png", "caption": ""}])
    with pytest.raises(ReportError, match=r"s\.section\.json.*'gone\.png' does not exist"):
        write_report(str(out))
    # a corrupt image and a truncated PNG
    (out / "bad.png").write_bytes(b"not a png at all")
    sc = _sidecar(out, images=[{"path": "bad.png"}])
    with pytest.raises(ReportError, match=r"s\.section\.json.*'bad\.png' is not a readable image"):
        write_report(str(out))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (out / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _sidecar(out, images=["trunc.png"])
    with pytest.raises(ReportError, match="'trunc.png' is not a readable image"):
        write_report(str(out))
    # a corrupt Parquet file
    (out / "t.parquet").write_bytes(b"PAR1 garbage")
    _sidecar(out, tables=[{"path": "t.parquet"}])
    with pytest.raises(ReportError, match=r"s\.section\.json.*'t\.parquet' is not a readable Parquet file"):
        write_report(str(out))
    # malformed JSON, missing keys, a path outside the directory
    sc.write_text("{not json")
    with pytest.raises(ReportError, match=r"s\.section\.json: not a readable section sidecar"):
        write_report(str(out))
    sc.write_text(json.dumps({"title": "no name"}))
    with pytest.raises(ReportError, match=r"s\.section\.json: missing or empty 'name'"):
        write_report(str(out))
    (tmp_path / "outside.png").write_bytes(b"")
    _sidecar(out, images=["../outside.png"])
    with pytest.raises(ReportError, match="not inside the output directory"):
        write_report(str(out))
    _sidecar(out, order="late")
    with pytest.raises(ReportError, match="'order' must be a number"):
        write_report(str(out))
    assert issubclass(ReportError, InputError)
    assert not (out / "report.html").exists()


def test_write_section_validates(tmp_path):
    with pytest.raises(ReportError, match="image file 'x.png' does not exist"):
        write_section(str(tmp_path), "a", "A", images=["x.png"])
    with pytest.raises(ReportError, match="must be letters"):
        write_section(str(tmp_path), "../a", "A")
    with pytest.raises(ReportError, match="output directory"):
        write_section(str(tmp_path / "no"), "a", "A")
    with pytest.raises(ReportError, match="each table must be"):
        write_section(str(tmp_path), "a", "A", tables=[3])
    assert not list(tmp_path.iterdir())


def test_format_value():
    assert format_value(0.123456) == "0.1235" and format_value(3) == "3" and format_value(None) == "—"
    assert format_value(1.5e-7) == "1.500e-07" and format_value(float("nan")) == "NaN"
    assert format_value(np.float32(0.71)) == "0.71" and format_value(True) == "true"
    assert format_value(list(range(100))) == "100 values: min 0, mean 49.5, max 99"     # an array: summarised
    assert format_value(np.linspace(0, 1, 64)) == "64 values: min 0, mean 0.5, max 1"
    assert format_value(np.full((3, 2), 0.5)) == "[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]"
    assert format_value("x" * 500).endswith("…") and len(format_value("x" * 500)) == 240
    names = [f"transformer.resblocks.{i}.attn.head.{i}" for i in range(6)]
    shown = format_value(names)                                     # names whole, cut by count
    assert all(n in shown for n in names[:4]) and shown.endswith("… (6 items)]") and "attn…" not in shown
    assert format_value(b"abc") == "<3 bytes>"


def test_report_subcommand(tmp_path, capsys):
    from vitdecomp.cli import main

    out = make_out(tmp_path)
    assert main(["query", "report", "--out", str(out), "--title", "CLI run"]) == 0
    assert "<title>CLI run</title>" in (out / "report.html").read_text(encoding="utf-8")
    assert main(["query", "report", "--out", str(tmp_path / "empty")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (/usr/bin/chromium); "
                                    "`apt-get install -y chromium` enables the headless-browser report test")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Injected into a test-only copy of the report (same folder, so links resolve the same way): after
# the load event, records every <img>'s decoded size, every link's resolved target, loads each plot
# link as an image, counts the page's own scripts, and writes the result into the DOM.
CHECK_SCRIPT = """<script id="vd-check-script">
window.addEventListener("load", async () => {
  const res = {images: [], links: [], scripts: document.scripts.length - 1};
  for (const im of document.images)
    res.images.push({alt: im.alt, data: im.src.startsWith("data:"), w: im.naturalWidth, h: im.naturalHeight});
  const probe = (url) => new Promise((ok) => {
    const i = new Image(); i.onload = () => ok(i.naturalWidth); i.onerror = () => ok(0); i.src = url; });
  for (const a of document.querySelectorAll("a[href]")) {
    const raw = a.getAttribute("href"), r = {raw: raw, abs: a.href, plot: a.classList.contains("plot")};
    if (raw.startsWith("#")) r.anchor = document.getElementById(decodeURIComponent(raw.slice(1))) !== null;
    else if (/\\.(png|jpe?g|gif|webp|svg)$/i.test(raw)) r.width = await probe(a.href);
    res.links.push(r);
  }
  const pre = document.createElement("pre"); pre.id = "vd-check"; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def browser_problems(report: Path, profile: Path) -> list[str]:
    """Render ``report`` in headless Chromium; what is wrong with it (empty list: nothing)."""
    check = report.with_name("_browser_check.html")
    check.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                     encoding="utf-8")
    try:
        r = _chromium(["--virtual-time-budget=10000", "--dump-dom", check.as_uri()], profile)
    finally:
        check.unlink()
    tag = '<pre id="vd-check">'
    start = r.stdout.find(tag)
    if start < 0:
        return [f"the browser check did not run (rc {r.returncode}): {r.stderr[-2000:]}"]
    res = json.loads(html.unescape(r.stdout[start + len(tag):r.stdout.index("</pre>", start)]))
    problems = []
    if res["scripts"]:
        problems.append(f"{res['scripts']} script element(s) in the report")
    if not res["images"]:
        problems.append("no images")
    for im in res["images"]:
        if not (im["data"] and im["w"] > 0 and im["h"] > 0):
            problems.append(f"image {im['alt']!r} not embedded or not decoded ({im})")
    plots = [x for x in res["links"] if x["plot"]]
    if len(plots) != len(res["images"]):
        problems.append(f"{len(res['images'])} images but {len(plots)} plot links")
    for x in res["links"]:
        if "anchor" in x:
            if not x["anchor"]:
                problems.append(f"link {x['raw']!r}: no such anchor")
            continue
        url = urllib.parse.urlparse(x["abs"])
        target = Path(urllib.request.url2pathname(url.path))
        if url.scheme != "file" or not target.is_file():
            problems.append(f"link {x['raw']!r} -> {x['abs']}: no such file")
        elif "width" in x and x["width"] <= 0:
            problems.append(f"link {x['raw']!r}: the browser could not load it as an image")
    return problems


def screenshot_is_blank(page: Path, shot: Path, profile: Path) -> bool:
    r = _chromium(["--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()], profile)
    assert shot.exists(), f"no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    dark = (px < 128).mean()                       # text, table borders, plot lines
    return bool(px.std() < 2.0 or dark < 0.002)


@needs_chromium
def test_report_renders_in_headless_chromium(tmp_path):
    out = make_out(tmp_path)
    report = Path(write_report(str(out)))
    assert browser_problems(report, tmp_path / "profile") == []
    assert not screenshot_is_blank(report, tmp_path / "shot.png", tmp_path / "profile2")
    assert not (out / "_browser_check.html").exists()


@needs_chromium
def test_browser_check_catches_broken_pages(tmp_path):
    out = make_out(tmp_path)
    report = Path(write_report(str(out)))
    text = report.read_text(encoding="utf-8")
    # an embedded image that does not decode, a plot link to a deleted file, a table link to nowhere
    i = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    text = text[:i] + base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode() + text[text.index('"', i):]
    text = text.replace('href="ablation.parquet"', 'href="missing.parquet"')
    text = text.replace("#sec-zeta", "#sec-nowhere")
    report.write_text(text + "<script>1</script>", encoding="utf-8")
    (out / "sub" / "sheet 1.png").unlink()
    problems = "\n".join(browser_problems(report, tmp_path / "profile"))
    assert "not embedded or not decoded" in problems
    assert "missing.parquet" in problems and "no such file" in problems
    assert "sheet%201.png" in problems
    assert "'#sec-nowhere': no such anchor" in problems
    assert "script element" in problems
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert screenshot_is_blank(blank, tmp_path / "blank.png", tmp_path / "profile2")
