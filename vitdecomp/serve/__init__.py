"""The explorer (``vitdecomp serve``): a local web app over a store, its fit and query outputs.

:class:`~vitdecomp.serve.data.Explorer` computes what the pages show with the library's query and
fit functions; :func:`~vitdecomp.serve.app.create_app` is the Flask app (Jinja2 templates, the
package's own static files, nothing from the network); :func:`serve` runs it.
"""
from __future__ import annotations


def serve(cfg, ready=None) -> None:
    """Run the explorer for a :class:`vitdecomp.config.ServeConfig` until interrupted."""
    from .app import serve as _serve

    _serve(cfg, ready=ready)


def build(cfg):
    """``(Explorer, Flask app)`` for a :class:`vitdecomp.config.ServeConfig`."""
    from .app import build as _build

    return _build(cfg)


__all__ = ["build", "serve"]
