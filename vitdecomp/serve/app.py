"""The explorer's web app: Flask routes rendering Jinja2 templates (autoescaped) over an
:class:`~vitdecomp.serve.data.Explorer`. Scripts and stylesheets are the package's own
``static/`` files; no page refers to another host.

Pages: ``/`` (store, what is missing and which command makes it), ``/components`` (CompAttribute
heatmap), ``/component`` (top/bottom images, TextSpan texts, ablation effect), ``/neighbours``
(property-based nearest neighbours of a store image or an upload), ``/heads`` (per-head nearest
neighbours of an image and of a text), ``/segmentation`` (topic and contrastive segmentation),
``/robustness`` (mitigation and ablation plots), ``/interpretability``. Images are served by store
row id only (``/image?id=``): their URI is always read from the store, never from the request.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np
from flask import Flask, Response, abort, render_template, request

from ..errors import VitdecompError
from .data import Explorer
from .plots import grouped_bars, lines, score_color

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _int(name: str, default: int, lo: int = 1, hi: int = 200) -> int:
    try:
        return max(lo, min(hi, int(request.values.get(name, default))))
    except (TypeError, ValueError):
        return default


def create_app(ex: Explorer) -> Flask:
    """The Flask app over ``ex`` (routes in the module docstring)."""
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config["MAX_CONTENT_LENGTH"] = ex.cfg.max_upload_bytes + 64 * 1024     # multipart overhead
    if ex.cfg.host in LOOPBACK:
        # a page on another site cannot reach the app through DNS rebinding
        app.config["TRUSTED_HOSTS"] = ["127.0.0.1", "localhost", "[::1]", "::1"]
    app.jinja_env.globals.update(ex=ex, score_color=score_color)

    def page(template: str, **kw):
        t0 = time.time()
        html = render_template(template, **kw)
        log.debug("%s rendered in %.3f s", template, time.time() - t0)
        return html

    def failure(e: Exception, template: str, status: int = 400, **kw):
        return page(template, error=str(e), **kw), status

    def expand(component: str) -> list[str]:
        """A component of the store's space, or an attention layer = all of its heads."""
        if component in ex.space_names:
            return [component]
        heads = [c.name for c in ex.st.components if c.kind == "head" and c.path == component
                 and c.name in ex.space_names]
        if heads:
            return heads
        import difflib

        raise VitdecompError(f"unknown component {component!r}; close: "
                             f"{difflib.get_close_matches(component, ex.head_choices() + ex.space_names, n=3)}")

    @app.errorhandler(413)
    def too_large(_e):
        return page("error.html", error=f"the upload is larger than the limit of {ex.cfg.max_upload_bytes} bytes "
                                        "(--max-upload-bytes)"), 413

    @app.route("/")
    def index():
        return page("index.html", missing=ex.missing(), title="Overview")

    @app.route("/components")
    def components():
        compute = request.args.get("compute") == "1"
        try:
            got = ex.scores(compute=compute)
        except VitdecompError as e:
            return failure(e, "components.html", scores=None, title="Components")
        if got is None:
            return page("components.html", scores=None, title="Components")
        sc, names, props, source = got
        vmax = float(np.nanmax(np.abs(sc))) if sc.size else 1.0
        return page("components.html", scores=sc, names=names, props=props, source=source, vmax=vmax,
                    title="Components")

    @app.route("/component")
    def component():
        name = request.args.get("name", "")
        prop = request.args.get("property") or None
        n = _int("k", 8, hi=64)
        ctx = dict(name=name, prop=prop, texts=(ex.textspan or {}).get(name), effects=[], top=None, bottom=None,
                   row_scores=None, title=f"Component {name}")
        if name not in ex.names and name not in ex.space_names:
            return failure(VitdecompError(f"{name!r} is not a component of the store"), "component.html", **ctx)
        ctx["effects"] = ex.ablation_effects(name)
        got = ex.scores(compute=False)
        if got is not None and name in got[1]:
            sc, names, props, _ = got
            ctx["row_scores"] = list(zip(props, sc[names.index(name)]))
        if prop:
            try:
                if prop not in ex.properties:
                    raise VitdecompError(f"unknown property {prop!r}; known: {list(ex.properties)}")
                ctx["top"], ctx["bottom"] = ex.extremes(name, ex.property_direction(prop), n)
            except VitdecompError as e:
                return failure(e, "component.html", **ctx)
        return page("component.html", **ctx)

    @app.route("/neighbours", methods=["GET", "POST"])
    def neighbours():
        prop = request.values.get("property") or next(iter(ex.properties))
        image_id = (request.values.get("image_id") or "").strip()
        n = _int("k", ex.cfg.top_images)
        top_c = _int("top_components", ex.cfg.top_components, hi=64)
        ctx = dict(prop=prop, image_id=image_id, k=n, top_components=top_c, hits=None, comps=None, how=None,
                   preview=None, title="Property-based nearest neighbours", upload_error=None)
        try:
            if request.method == "POST":
                f = request.files.get("upload")
                if f is None:
                    raise VitdecompError("no file in the upload form")
                img = ex.decode_upload(f.read())
                ctx["preview"] = ex.preview(img)
                comps = ex.property_components(prop, top_c, specific=True)
                c = ex.decompose_image(img)
                v = np.sum([c[k] for k in comps], 0)
                v = (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)
                ctx["hits"], ctx["how"] = ex.neighbours(comps, v, n)
                ctx["comps"] = comps
            elif image_id:
                comps = ex.property_components(prop, top_c, specific=True)
                ctx["hits"], ctx["how"] = ex.neighbours_of_id(comps, image_id, n)
                ctx["comps"] = comps
        except VitdecompError as e:
            return failure(e, "neighbours.html", **ctx)
        return page("neighbours.html", **ctx)

    @app.route("/heads")
    def heads():
        comp = request.args.get("component") or (ex.head_choices() or ex.space_names)[-1]
        image_id = (request.args.get("image_id") or "").strip()
        text = (request.args.get("text") or "").strip()
        n = _int("k", ex.cfg.top_images)
        ctx = dict(component=comp, image_id=image_id, text=text, k=n, image_hits=None, text_hits=None, how=None,
                   comps=None, title="Per-head nearest neighbours")
        try:
            comps = expand(comp)
            ctx["comps"] = comps
            if image_id:
                ctx["image_hits"], ctx["how"] = ex.neighbours_of_id(comps, image_id, n)
            if text:
                ctx["text_hits"] = ex.text_neighbours(comps, text, n)
        except VitdecompError as e:
            return failure(e, "heads.html", **ctx)
        return page("heads.html", **ctx)

    @app.route("/segmentation")
    def segmentation():
        comp = request.args.get("component") or (ex.head_choices() or [""])[-1]
        ctx = dict(component=comp, image_id=(request.args.get("image_id") or "").strip(),
                   text=(request.args.get("text") or "").strip(), text2=(request.args.get("text2") or "").strip(),
                   title="Topic and contrastive segmentation", suggestions=[])
        names = [comp] if comp in (ex.textspan or {}) else [c for c in (ex.textspan or {}) if c.startswith(comp + ".")]
        ctx["suggestions"] = list(dict.fromkeys(r["text"] for c in names for r in ex.textspan[c]))[:40]
        err = ex.model_error()
        if err:
            return failure(VitdecompError(err), "segmentation.html", **ctx)
        return page("segmentation.html", **ctx)

    @app.route("/segmentation.png")
    def segmentation_png():
        try:
            png, _ = ex.segmentation(request.args.get("image_id", ""), request.args.get("component", ""),
                                     [request.args.get("text", ""), request.args.get("text2", "")])
        except VitdecompError as e:
            return Response(str(e), status=400, mimetype="text/plain")
        return Response(png, mimetype="image/png")

    @app.route("/robustness")
    def robustness():
        mits = []
        for nm in ex.mitigation_names():
            m = ex.mitigation(nm)
            s = m["summary"]
            groups = sorted(s["groups"]["before"])
            chart = grouped_bars(groups, {"before": [s["groups"]["before"].get(g) for g in groups],
                                          "after": [s["groups"]["after"].get(g) for g in groups]},
                                 f"{nm}: per-group accuracy ({s.get('ranking')}, k={s.get('k')})")
            mits.append({"name": nm, "summary": s, "chart": chart,
                         "ablated": [r for r in m["components"] if r.get("ablated")]})
        ab = ex.ablation()
        ab_chart = None
        if ab:
            curves: dict = {}
            for r in ab["rows"]:
                if r["curve"] == "cumulative":
                    curves.setdefault(r["kind"], []).append((r["step"], r["accuracy"]))
            ab_chart = lines({k: sorted(v) for k, v in curves.items()}, "Mean ablation, cumulative",
                             "layers ablated", baseline=ab["summary"].get("baseline_accuracy"))
        return page("robustness.html", mits=mits, ablation=ab, ab_chart=ab_chart, title="Group robustness")

    @app.route("/interpretability")
    def interpretability():
        return page("interpretability.html", data=ex.interpretability(), title="Interpretability scores")

    @app.route("/image")
    def image():
        image_id = request.args.get("id", "")
        png = ex.thumbnail(image_id) if image_id else None
        if png is None:
            abort(404)
        return Response(png, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.after_request
    def headers(resp):
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "style-src 'self' 'unsafe-inline'; script-src 'self'")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    return app


def start_server(app: Flask, host: str = "127.0.0.1", port: int = 0):
    """Serve ``app`` from a background thread (werkzeug's threaded server); returns ``(server, url)``.
    ``server.shutdown()`` stops it. Port 0 picks a free port."""
    import threading

    from werkzeug.serving import make_server

    srv = make_server(host, port, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, name="vitdecomp-serve", daemon=True)
    t.start()
    h = f"[{host}]" if ":" in host else host
    return srv, f"http://{h}:{srv.server_port}"


def build(cfg) -> tuple[Explorer, Flask]:
    """The explorer and its app for a :class:`~vitdecomp.config.ServeConfig`."""
    ex = Explorer(cfg)
    return ex, create_app(ex)


def serve(cfg, ready: Optional[Callable[[str], None]] = None) -> None:
    """Run the explorer in this thread until interrupted; ``ready(url)`` is called once it listens."""
    from werkzeug.serving import make_server

    _, app = build(cfg)
    srv = make_server(cfg.host, cfg.port, app, threaded=True)
    h = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if ready:
        ready(f"http://{h}:{srv.server_port}")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
