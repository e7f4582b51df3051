"""The query report: one self-contained static HTML page per output directory.

Every query subcommand writes its tables (Parquet) and plots (PNG) into an output directory ``OUT``
together with a sidecar ``OUT/<name>.section.json`` (:func:`write_section`)::

    {"name": "ablation", "title": "Mean-ablation curves", "order": 30,
     "summary": "plain text", "facts": {"baseline accuracy": 0.71},
     "images": [{"path": "ablation.png", "caption": "..."}],
     "tables": [{"path": "ablation.parquet", "caption": "...", "max_rows": 40}]}

:func:`write_report` gathers the sidecars (sorted by ``order``, then ``name``) into
``OUT/report.html``: inline CSS, no JavaScript, no network references; every image embedded as a
``data:`` URI and wrapped in a link to its file; every table shown (first ``max_rows`` rows) with a
link to its Parquet file and its row count. The Parquet files are the machine-readable form.

``OUT`` is a local directory or ``s3://bucket/prefix``: every function takes a path/URI (with the
job's :class:`~vitdecomp.io.S3Settings` as ``s3``) or an :class:`~vitdecomp.io.OutputDir`, and reads
and writes only through it.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import re
import urllib.parse
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import InputError
from ..io import OutputDir, S3Settings, open_output

log = logging.getLogger(__name__)

SECTION_SUFFIX = ".section.json"
REPORT_NAME = "report.html"
DEFAULT_MAX_ROWS = 40
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class ReportError(InputError):
    """A section sidecar, or a file it references, is missing, malformed or unreadable."""


# --------------------------------------------------------------------------------------------- sections
def _rel_path(out: OutputDir, path: str, where: str) -> str:
    """``path`` (relative to ``out``, or an absolute path / URI inside it) as a normalised relative
    POSIX path."""
    if not isinstance(path, str) or not path:
        raise ReportError(f"{where}: a path must be a non-empty string, got {path!r}")
    rel = out.relative(path)
    if rel is None:
        raise ReportError(f"{where}: {path!r} is not inside the output directory {out.uri()!r}; "
                          "write the file there so the report can link it")
    return rel


def _items(od: OutputDir, items: Optional[Iterable], kind: str, where: str) -> list[dict]:
    """Normalise ``[path | (path, caption) | {"path", "caption", ...}]`` and check each file exists."""
    out = []
    for it in items or []:
        if isinstance(it, str):
            d = {"path": it, "caption": ""}
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            d = {"path": it[0], "caption": it[1]}
        elif isinstance(it, Mapping) and "path" in it:
            d = dict(it)
        else:
            raise ReportError(f"{where}: each {kind} must be a path, (path, caption) or "
                              f"{{'path': ..., 'caption': ...}}, got {it!r}")
        d["path"] = _rel_path(od, d["path"], where)
        d["caption"] = str(d.get("caption") or "")
        if not od.is_file(d["path"]):
            raise ReportError(f"{where}: {kind} file {d['path']!r} does not exist in {od.uri()!r}")
        if kind == "table" and d.get("max_rows") is not None:
            d["max_rows"] = int(d["max_rows"])
        out.append(d)
    return out


def _jsonable(v: Any) -> Any:
    """numpy scalars/arrays and other odd values → plain JSON values (for ``facts``)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    return str(v)


def write_section(out_dir: Union[str, OutputDir], name: str, title: str, order: int = 100, summary: str = "",
                  facts: Optional[Mapping[str, Any]] = None, images: Optional[Sequence] = None,
                  tables: Optional[Sequence] = None, s3: Optional[S3Settings] = None) -> str:
    """Write the sidecar ``out_dir/<name>.section.json`` describing one query's outputs; returns its
    path (local) or URI (``s3://``). ``out_dir``: a path/URI (reached with ``s3``) or an OutputDir.

    ``images`` and ``tables`` are lists of paths (relative to ``out_dir`` or absolute inside it),
    ``(path, caption)`` pairs or dicts ``{"path", "caption"[, "max_rows"]}``; every file must exist.
    ``facts`` maps labels to JSON-able values (numpy scalars and arrays are converted). Plain text
    only: the report escapes everything.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ReportError(f"section name {name!r} must be letters, digits, '_', '.' or '-' "
                          "(it names the sidecar file)")
    out = open_output(out_dir, s3)
    if not out.is_dir():
        raise ReportError(f"section {name!r}: output directory {out.uri()!r} does not exist")
    where = f"section {name!r}"
    doc = {"name": name, "title": str(title), "order": int(order), "summary": str(summary or ""),
           "facts": json.loads(json.dumps(dict(facts or {}), default=_jsonable)),
           "images": _items(out, images, "image", where),
           "tables": _items(out, tables, "table", where)}
    return out.write_json(name + SECTION_SUFFIX, doc, ensure_ascii=False)


def read_sections(out_dir: Union[str, OutputDir], s3: Optional[S3Settings] = None) -> list[dict]:
    """All ``*.section.json`` in ``out_dir`` (a path/URI reached with ``s3``, or an OutputDir),
    validated, sorted by (order, name)."""
    out = open_output(out_dir, s3)
    if not out.is_dir():
        raise ReportError(f"report: output directory {out.uri()!r} does not exist")
    files = out.list(SECTION_SUFFIX)
    if not files:
        raise ReportError(f"report: no *{SECTION_SUFFIX} in {out.uri()!r}; run a query subcommand "
                          "into that output directory first")
    sections, seen = [], {}
    for fn in files:
        sidecar = out.uri(fn)
        try:
            doc = json.loads(out.read_bytes(fn).decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{sidecar}: not a readable section sidecar: {e}") from None
        if not isinstance(doc, dict):
            raise ReportError(f"{sidecar}: must hold a JSON object, got {type(doc).__name__}")
        for key in ("name", "title"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ReportError(f"{sidecar}: missing or empty {key!r} (a string)")
        if not _NAME_RE.match(doc["name"]):
            raise ReportError(f"{sidecar}: name {doc['name']!r} must be letters, digits, '_', '.' or '-'")
        if doc["name"] in seen:
            raise ReportError(f"{sidecar}: section name {doc['name']!r} is also used by {seen[doc['name']]}")
        seen[doc["name"]] = sidecar
        try:
            order = float(doc.get("order", 100))
        except (TypeError, ValueError):
            raise ReportError(f"{sidecar}: 'order' must be a number, got {doc.get('order')!r}") from None
        facts = doc.get("facts") or {}
        if not isinstance(facts, dict):
            raise ReportError(f"{sidecar}: 'facts' must be an object label: value")
        for key in ("images", "tables"):
            if not isinstance(doc.get(key) or [], list):
                raise ReportError(f"{sidecar}: {key!r} must be a list")
        sections.append({"name": doc["name"], "title": doc["title"], "order": order,
                         "summary": str(doc.get("summary") or ""), "facts": facts,
                         "images": _items(out, doc.get("images"), "image", sidecar),
                         "tables": _items(out, doc.get("tables"), "table", sidecar),
                         "sidecar": sidecar})
    sections.sort(key=lambda s: (s["order"], s["name"]))
    return sections


# --------------------------------------------------------------------------------------------- formatting
def format_value(v: Any, max_items: int = 4, max_chars: int = 240) -> str:
    """One cell or fact as short plain text: floats to 4 significant digits; a long list of numbers is
    summarised (count, min, mean, max); other lists show their first ``max_items`` items whole; a string
    is cut only beyond ``max_chars``."""
    if v is None:
        return "—"
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        if len(v) > max_items and all(_is_number(x) for x in v):
            finite = [float(x) for x in v if not (isinstance(x, float) and math.isnan(x))]
            if not finite:
                return f"{len(v)} values, all NaN"
            return (f"{len(v)} values: min {format_value(min(finite))}, mean "
                    f"{format_value(sum(finite) / len(finite))}, max {format_value(max(finite))}")
        # names (strings) are shown whole; a long list is cut by count, never inside an item
        shown = ", ".join(format_value(x, max_items, max_chars) for x in v[:max_items])
        more = f", … ({len(v)} items)" if len(v) > max_items else ""
        return f"[{shown}{more}]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {format_value(x, max_items, max_chars)}" for k, x in v.items())
    s = str(v)
    return s if len(s) <= max_chars else s[:max_chars - 1] + "…"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _href(rel: str) -> str:
    return html.escape(urllib.parse.quote(rel), quote=True)


def _anchor(name: str) -> str:
    return "sec-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _image_html(out: OutputDir, img: dict, sidecar: str) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        data = out.read_bytes(img["path"])
    except OSError as e:
        raise ReportError(f"{sidecar}: image {img['path']!r}: {e}") from None
    if img["path"].lower().endswith(".svg"):
        if b"<svg" not in data[:4096]:
            raise ReportError(f"{sidecar}: image {img['path']!r} is not an SVG file")
        mime = "image/svg+xml"
    else:
        import io

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.load()                          # decodes the pixels: a truncated file fails here
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ReportError(f"{sidecar}: image {img['path']!r} is not a readable image: {e}") from None
        if fmt not in _IMAGE_MIME:
            raise ReportError(f"{sidecar}: image {img['path']!r} is {fmt}; use PNG, JPEG, GIF, WebP or SVG")
        mime = _IMAGE_MIME[fmt]
    cap = html.escape(img["caption"])
    alt = cap or html.escape(img["path"])
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return (f'<figure><a class="plot" href="{_href(img["path"])}"><img src="{uri}" alt="{alt}"></a>'
            f'<figcaption>{cap}{" — " if cap else ""}<a href="{_href(img["path"])}">'
            f'{html.escape(img["path"])}</a></figcaption></figure>')


def _table_html(out: OutputDir, tab: dict, sidecar: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    max_rows = tab.get("max_rows")
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max(0, int(max_rows))
    try:
        pf = pq.ParquetFile(out.open_input_file(tab["path"]))
        n = pf.metadata.num_rows
        schema = pf.schema_arrow
        head = pa.Table.from_batches(list(_first_rows(pf, max_rows)), schema=schema)
    except (OSError, pa.ArrowException) as e:
        raise ReportError(f"{sidecar}: table {tab['path']!r} is not a readable Parquet file: {e}") from None
    cols = schema.names
    rows = head.to_pylist()
    numeric = {c: pa.types.is_integer(schema.field(c).type) or pa.types.is_floating(schema.field(c).type)
               for c in cols}
    out = ['<div class="table"><table><thead><tr>']
    out += [f'<th{" class=num" if numeric[c] else ""}>{html.escape(c)}</th>' for c in cols]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td{" class=num" if _is_number(r[c]) else ""}>{html.escape(format_value(r[c]))}</td>'
            for c in cols) + "</tr>")
    out.append("</tbody></table></div>")
    shown = f"first {len(rows)} of {n:,} rows" if len(rows) < n else f"{n:,} rows"
    cap = html.escape(tab["caption"])
    out.append(f'<p class="tcap">{cap}{" — " if cap else ""}{shown}, {len(cols)} columns; all rows in '
               f'<a href="{_href(tab["path"])}">{html.escape(tab["path"])}</a> (Parquet)</p>')
    return "".join(out)


def _first_rows(pf, n: int):
    if n <= 0:
        return
    left = n
    for b in pf.iter_batches(batch_size=min(n, 65536)):
        yield b.slice(0, left)
        left -= min(left, b.num_rows)
        if left == 0:
            return


def _facts_html(facts: Mapping[str, Any]) -> str:
    if not facts:
        return ""
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(format_value(v, 8, 400))}</dd>"
                    for k, v in facts.items())
    return f'<dl class="facts">{items}</dl>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5rem;color:#1d1d1f;background:#fff;line-height:1.45}
header{border-bottom:2px solid #ddd;margin-bottom:1rem}h1{margin:.2rem 0}.meta{color:#666;font-size:.9rem}
nav ol{padding-left:1.4rem}section{margin:2rem 0;padding-top:.5rem}section+section{border-top:1px solid #eee}
.summary{white-space:pre-wrap}dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dl.facts dt{font-weight:600}dl.facts dd{margin:0;font-family:ui-monospace,monospace;word-break:break-word}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption,.tcap{color:#444;font-size:.9rem}div.table{overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
td{max-width:32rem;overflow-wrap:anywhere;vertical-align:top}
th{background:#f5f5f7}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}footer{color:#888;font-size:.8rem;margin-top:3rem}
"""


def render_report(out_dir: Union[str, OutputDir], sections: list[dict], title: Optional[str] = None,
                  s3: Optional[S3Settings] = None) -> str:
    """The report page for ``sections`` (from :func:`read_sections`) as an HTML string; images are
    read through ``out_dir`` (a path/URI reached with ``s3``, or an OutputDir)."""
    from ..version import __version__

    out = open_output(out_dir, s3)
    title = title or f"vitdecomp report — {out.uri().rstrip('/').rsplit('/', 1)[-1]}"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    t = html.escape(title)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{t}</title><style>{_CSS}</style></head><body>",
             f'<header><h1>{t}</h1><p class="meta">Generated {now} by vitdecomp {html.escape(__version__)} '
             f"from {len(sections)} section(s) in <code>{html.escape(out.uri())}</code></p>",
             "<nav><strong>Contents</strong><ol>"]
    parts += [f'<li><a href="#{_anchor(s["name"])}">{html.escape(s["title"])}</a></li>' for s in sections]
    parts.append("</ol></nav></header><main>")
    for s in sections:
        parts.append(f'<section id="{_anchor(s["name"])}"><h2>{html.escape(s["title"])}</h2>')
        if s["summary"]:
            parts.append(f'<p class="summary">{html.escape(s["summary"])}</p>')
        parts.append(_facts_html(s["facts"]))
        parts += [_image_html(out, img, s["sidecar"]) for img in s["images"]]
        parts += [_table_html(out, tab, s["sidecar"]) for tab in s["tables"]]
        parts.append("</section>")
    parts.append("</main><footer>Static page: plots are embedded and link to their files; tables link to "
                 "their Parquet files, which hold every row.</footer></body></html>\n")
    return "\n".join(parts)


def write_report(out_dir: Union[str, OutputDir], title: Optional[str] = None,
                 s3: Optional[S3Settings] = None) -> str:
    """Gather ``out_dir/*.section.json`` into ``out_dir/report.html`` (written atomically); returns
    its path (local) or URI (``s3://``). ``out_dir``: a path/URI reached with ``s3``, or an OutputDir.

    Raises :class:`ReportError` naming the sidecar and the file when a referenced file is missing
    or unreadable, and when ``out_dir`` holds no sidecar.
    """
    out = open_output(out_dir, s3)
    sections = read_sections(out)
    page = render_report(out, sections, title)
    path = out.write_text(REPORT_NAME, page)
    log.info("report: %d section(s) -> %s", len(sections), path)
    return path
