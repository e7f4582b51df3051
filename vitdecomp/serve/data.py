"""What the explorer shows, computed with the library's own query and fit functions (so the numbers
are the CLI's): :class:`Explorer` holds one opened store (read-only), the optional fit and query
directories, lazily the store's rebuilt model and text model, and the vector indexes it caches.

Nothing here loads a whole store: every pass streams ``Store.iter_batches`` (through
:func:`vitdecomp.fit.compalign.aligned_batches` when an aligner maps the store into a CLIP space)
and keeps at most the top rows; nearest neighbours are an exact scan below ``index_threshold`` rows
and a Lance IVF index above it, built once per (store version, components, aligner) into the cache
directory — never into the store.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..config import OptionError, ServeConfig, TextModelOptions, parse_blocks
from ..errors import InputError, VitdecompError

log = logging.getLogger(__name__)

THUMB = 128


@dataclass
class Missing:
    """Something the explorer cannot show, and the command that produces it."""
    what: str
    command: str


def _exists(path: str, s3=None) -> bool:
    import pyarrow.fs as pafs

    from ..io import resolve

    try:
        fs, p = resolve(path, s3)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    except (OSError, ValueError):
        return False


def _read_parquet(path: str, s3=None):
    import pyarrow.parquet as pq

    from ..io import resolve

    fs, p = resolve(path, s3)
    return pq.read_table(p, filesystem=fs)


def _read_json(path: str, s3=None):
    from ..io import read_bytes

    return json.loads(read_bytes(path, s3).decode("utf-8"))


def store_version(st) -> str:
    """A key that changes whenever the store's committed rows change (Lance version; Parquet commits)."""
    if st.format == "lance":
        import lance

        ds = lance.dataset(st.lance_uri("contributions"), storage_options=st.storage_options)
        return f"lance-v{ds.version}"
    recs = st.commit_records()
    return f"parquet-{len(recs)}-{recs[-1][0].rsplit('/', 1)[-1] if recs else 'empty'}"


def default_cache_dir(store_uri: str) -> str:
    """A sibling of a local store (``<store>.explorer-cache``) when its parent is writable, else
    ``~/.cache/vitdecomp/explorer/<hash of the store URI>``."""
    from ..io import is_s3

    if not is_s3(store_uri):
        path = os.path.abspath(store_uri).rstrip("/")
        parent = os.path.dirname(path)
        if os.access(parent, os.W_OK):
            return path + ".explorer-cache"
    h = hashlib.sha1(store_uri.encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~"), ".cache", "vitdecomp", "explorer", h)


def _sql_str(v: str) -> str:
    """A string literal for a Lance filter (quotes doubled)."""
    return "'" + str(v).replace("'", "''") + "'"


class Explorer:
    """The explorer's state over one store; every method returns plain values (the app renders them)."""

    def __init__(self, cfg: ServeConfig):
        from ..store import open_store

        cfg.check_required()
        self.cfg = cfg
        self.s3 = cfg.s3()
        self.st = open_store(cfg.store, s3_endpoint=cfg.s3_endpoint, s3_region=cfg.s3_region)
        self.manifest = self.st.manifest
        self.names = self.st.names
        self.rows = self.st.count()
        self.version = store_version(self.st)
        self.cache_dir = cfg.index_cache or default_cache_dir(self.st.uri)
        self._lock = threading.RLock()                 # caches and indexes
        self._model_lock = threading.RLock()           # the rebuilt model and the text model
        self._scores_lock = threading.RLock()          # CompAttribute scores (read or computed once)
        self._uris: "OrderedDict[str, str]" = OrderedDict()       # image_id → uri, filled from store reads
        self._model = None
        self._model_error: Optional[str] = None
        self._text = None
        self._text_error: Optional[str] = None
        self._scores = None
        self._indexes: dict = {}
        self._index_locks: dict = {}
        self.aligner = None
        self.aligner_error = None
        if cfg.aligner:
            from ..fit.compalign import Aligner, check_compatible

            self.aligner = Aligner.load(cfg.aligner, self.s3)
            check_compatible(self.aligner, self.st)
        from ..query.compattribute import read_properties

        self.properties = read_properties(cfg.properties, self.s3)
        self.textspan = self._load_textspan()
        self.query_files = self._scan_query()
        # rebuild the model in the background: the first page does not wait for it
        threading.Thread(target=self.model_error, name="vitdecomp-serve-model", daemon=True).start()

    # ------------------------------------------------------------------ inputs
    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def is_clip(self) -> bool:
        m = self.manifest["model"]
        return m["readout"]["space"] == "clip" and m["name"].startswith("open_clip:")

    @property
    def in_clip_space(self) -> bool:
        return self.is_clip or self.aligner is not None

    @property
    def space_names(self) -> list[str]:
        """The components searchable in the CLIP space (the aligner's, else the store's)."""
        return list(self.aligner.names) if self.aligner is not None else list(self.names)

    def _load_textspan(self) -> Optional[dict]:
        if not self.cfg.fit:
            return None
        from ..io import join
        from ..query.interpretability import texts_from_table

        path = join(self.cfg.fit, "textspan.parquet")
        if not _exists(path, self.s3):
            return None
        t = _read_parquet(path, self.s3)
        out: dict[str, list[dict]] = {}
        for r in t.to_pylist():
            out.setdefault(r["component"], []).append(r)
        for v in out.values():
            v.sort(key=lambda r: r["rank"])
        texts_from_table(t)                 # checks the columns
        return out

    def _scan_query(self) -> dict:
        """The query outputs present in ``--query`` (file name → path)."""
        found = {}
        if not self.cfg.query:
            return found
        from ..io import join, open_output

        names = open_output(self.cfg.query, self.s3).list()
        for n in names:
            n = n.rsplit("/", 1)[-1]
            if n.endswith((".parquet", ".json")):
                found[n] = join(self.cfg.query, n)
        return found

    def missing(self) -> list[Missing]:
        """What cannot be shown, and which command produces it."""
        out = []
        st = self.cfg.store
        if not self.cfg.fit:
            out.append(Missing("TextSpan texts (no --fit directory)",
                               f"vitdecomp fit textspan --store {st} --out FIT"))
        elif self.textspan is None:
            out.append(Missing(f"TextSpan texts (no textspan.parquet in {self.cfg.fit})",
                               f"vitdecomp fit textspan --store {st} --out {self.cfg.fit}"))
        q = self.cfg.query or "QUERY"
        if not self.cfg.query:
            out.append(Missing("query results (no --query directory): CompAttribute, ablation, mitigation, "
                               "interpretability", f"vitdecomp query compattribute --store {st} --out QUERY"))
        else:
            if "compattribute.parquet" not in self.query_files:
                out.append(Missing("CompAttribute scores (computed on demand instead)",
                                   f"vitdecomp query compattribute --store {st} --out {q}"))
            if not self.mitigation_names():
                out.append(Missing("spurious-feature mitigation results",
                                   f"vitdecomp query mitigate --store {st} --out {q} --label-column L "
                                   "--group-column G"))
            if "ablation.parquet" not in self.query_files:
                out.append(Missing("mean-ablation curves", f"vitdecomp query ablate --store {st} --out {q} "
                                                             "--label-column L"))
            if "interpretability.json" not in self.query_files:
                out.append(Missing("interpretability scores (computed here from the TextSpan texts when --fit has "
                                   "them)", f"vitdecomp query interpretability --textspan FIT --out {q}"))
        if not self.in_clip_space:
            out.append(Missing(f"text queries ({self.model_name} is not a CLIP model)",
                               f"vitdecomp fit compalign --store {st} --out ALIGN, then serve with --aligner ALIGN"))
        if self._model_error is not None:             # known without waiting for the model
            out.append(Missing(f"on-the-fly decomposition (uploads, segmentation): {self._model_error}",
                               "vitdecomp serve ... --checkpoint PATH (the weights the store was made with)"))
        return out

    # ------------------------------------------------------------------ models
    def model(self):
        """The store's model rebuilt from its manifest; raises InputError with the reason when it cannot be."""
        with self._model_lock:
            if self._model is None and self._model_error is None:
                try:
                    import torch

                    from ..models import rebuild_model

                    dev = self.cfg.device
                    if dev == "auto":
                        dev = "cuda" if torch.cuda.is_available() else "cpu"
                    self._model = rebuild_model(self.manifest, self.cfg.checkpoint, dev)
                except (VitdecompError, OSError, RuntimeError, KeyError, ValueError) as e:
                    self._model_error = (f"the store's model {self.model_name} cannot be rebuilt ({e}); "
                                         "on-the-fly decomposition is disabled")
                    log.warning("%s", self._model_error)
            if self._model is None:
                raise InputError(self._model_error)
            return self._model

    def model_error(self) -> Optional[str]:
        """None when the model can be rebuilt (tries once), else why not."""
        try:
            self.model()
        except InputError:
            pass
        return self._model_error

    def text_model(self):
        """The open_clip model whose text tower shares the contributions' space."""
        with self._model_lock:
            if self._text is None and self._text_error is None:
                try:
                    if self.aligner is None and self.is_clip and self.model_error() is None:
                        self._text = self.model()
                    else:
                        from ..fit.text import resolve_text_model

                        opts = TextModelOptions(clip=self.cfg.clip, clip_pretrained=self.cfg.clip_pretrained,
                                                clip_checkpoint=self.cfg.clip_checkpoint, cache_dir=self.cfg.cache_dir)
                        self._text = resolve_text_model(self.st, self.aligner, opts, what="text queries")
                except (VitdecompError, OSError, RuntimeError, KeyError, ValueError) as e:
                    self._text_error = f"texts cannot be embedded: {e}"
            if self._text is None:
                raise InputError(self._text_error)
            return self._text

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings ``[n, d]`` (templated, as every query job does)."""
        from ..fit.text import encode_texts

        return encode_texts(self.text_model(), list(texts), cache_dir=self.cfg.text_cache).astype(np.float64)

    # ------------------------------------------------------------------ CompAttribute
    def scores(self, compute: bool = False):
        """``(scores [K, P], component names, property names, source)`` — from ``--query``'s
        ``compattribute.parquet`` when it covers every property, else computed (on demand: ``compute``)
        over the whole store in one streamed pass and cached; None when neither."""
        with self._scores_lock:                         # a long pass must not hold the cache lock
            if self._scores is not None:
                return self._scores
            props = list(self.properties)
            path = self.query_files.get("compattribute.parquet")
            if path:
                t = _read_parquet(path, self.s3).to_pylist()
                have = list(dict.fromkeys(r["property"] for r in t))
                if set(props) <= set(have):
                    names = list(dict.fromkeys(r["component"] for r in t))
                    sc = np.full((len(names), len(props)), np.nan)
                    for r in t:
                        if r["property"] in props:
                            sc[names.index(r["component"]), props.index(r["property"])] = r["score"]
                    self._scores = (sc, names, props, f"{path}")
                    return self._scores
                log.info("%s scores %s, not every property (%s): computing", path, have, props)
            cached = os.path.join(self.cache_dir, self.version, f"compattribute-{self._key(props)}.json")
            if os.path.exists(cached):
                with open(cached) as f:
                    d = json.load(f)
                self._scores = (np.array(d["scores"]), d["names"], d["properties"], "computed (cached)")
                return self._scores
            if not compute:
                return None
            from ..query.compattribute import compattribute

            t0 = time.time()
            _, sc, names = compattribute(self.st, self.text_model(), self.properties, aligner=self.aligner,
                                         distributed=False, cache_dir=self.cfg.text_cache)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(cached, "w") as f:
                json.dump({"scores": np.asarray(sc).tolist(), "names": list(names), "properties": props}, f)
            log.info("CompAttribute over %d rows in %.1f s", self.rows, time.time() - t0)
            self._scores = (np.asarray(sc), list(names), props, "computed on demand")
            return self._scores

    def _key(self, *parts) -> str:
        return hashlib.sha1(json.dumps([*parts, self.cfg.aligner or ""], default=str).encode()).hexdigest()[:16]

    def property_components(self, prop: str, n: int, specific: bool = True) -> list[str]:
        """The top ``n`` components for ``prop``: by how specifically they carry it (image retrieval,
        ``v_i − max(0, max_{j≠i} v_j)``) or by CompAttribute (text retrieval) — as ``query retrieve``."""
        from ..query.retrieval import specific_rank

        got = self.scores(compute=True)
        sc, names, props, _ = got
        if prop not in props:
            raise OptionError("property", f"unknown property {prop!r}; known: {props}")
        j = props.index(prop)
        rank = specific_rank(sc, j) if specific else sc[:, j]
        return [names[i] for i in np.argsort(-rank, kind="stable")[:n]]

    # ------------------------------------------------------------------ images
    def remember(self, ids: Sequence[str], uris: Sequence[str]) -> None:
        with self._lock:
            for i, u in zip(ids, uris):
                self._uris[i] = u
                self._uris.move_to_end(i)
            while len(self._uris) > 50_000:
                self._uris.popitem(last=False)

    def uri_of(self, image_id: str) -> Optional[str]:
        """The stored source URI of a row (None when the id is not in the store)."""
        with self._lock:
            if image_id in self._uris:
                return self._uris[image_id]
        t = self.st.read(columns=["image_id", "uri"], ids=[image_id])
        if t.num_rows == 0:
            return None
        u = t.column("uri")[0].as_py()
        self.remember([image_id], [u])
        return u

    def has_id(self, image_id: str) -> bool:
        return self.uri_of(image_id) is not None

    def thumbnail(self, image_id: str, size: int = THUMB) -> Optional[bytes]:
        """PNG bytes of a store row's image (read from its stored URI), a crossed-out tile when it cannot
        be read; None when the id is not in the store."""
        from ..io import decode_errors, read_image
        from ..query.retrieval import _unreadable_tile

        uri = self.uri_of(image_id)
        if uri is None:
            return None
        try:
            if not uri:
                raise FileNotFoundError("no source URI")
            im = read_image(uri, self.s3)
            im.thumbnail((size, size))
        except decode_errors():
            im = _unreadable_tile(size)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    def first_ids(self, n: int = 40) -> list[str]:
        """The first ``n`` image ids (one small batch, read once; for the pickers)."""
        if getattr(self, "_first", None) is None:
            self._first = []
            for b in self.st.iter_batches(components=[], columns=["uri"], batch_size=n):
                self.remember(b.ids, b.columns["uri"].to_pylist())
                self._first = list(b.ids)[:n]
                break
        return self._first

    # ------------------------------------------------------------------ nearest neighbours
    def _search_components(self, components: Sequence[str]) -> list[str]:
        comps = list(components)
        bad = [c for c in comps if c not in self.space_names]
        if bad:
            import difflib

            close = difflib.get_close_matches(bad[0], self.space_names)
            raise InputError(f"unknown component {bad[0]!r} (close: {close})")
        return comps

    def use_index(self) -> bool:
        return self.rows >= self.cfg.index_threshold

    def index(self, components: Sequence[str]):
        """The Lance IVF index of the components' normalised sums (built once, cached per store version)."""
        from ..query.retrieval import build_index

        comps = self._search_components(components)
        key = self._key(list(comps))
        with self._lock:
            if key in self._indexes:
                return self._indexes[key]
            lock = self._index_locks.setdefault(key, threading.Lock())
        with lock:                                      # one build per index; other requests go on
            with self._lock:
                if key in self._indexes:
                    return self._indexes[key]
            import lance

            path = os.path.join(self.cache_dir, self.version, f"index-{key}.lance")
            done = path + ".done"
            if os.path.exists(done):
                ds = lance.dataset(path)
            else:
                t0 = time.time()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                ds = build_index(self.st, comps, path, self.aligner)
                ds.create_scalar_index("image_id", index_type="BTREE")      # probe lookups by id
                with open(done, "w") as f:
                    json.dump({"components": comps, "rows": ds.count_rows(), "store": self.st.uri,
                               "version": self.version, "seconds": time.time() - t0}, f)
                log.info("built the vector index of %s (%d rows) in %.1f s -> %s", comps, ds.count_rows(),
                         time.time() - t0, path)
            with self._lock:
                self._indexes[key] = ds
            return ds

    def vector_of(self, image_id: str, components: Sequence[str]) -> np.ndarray:
        from ..query.retrieval import probe_vector

        return probe_vector(self.st, list(components), [image_id], self.aligner)

    def neighbours(self, components: Sequence[str], probe: np.ndarray, n: int, exclude=()) -> tuple[list, str]:
        """``[(id, uri, cosine)]`` of the normalised sums of ``components`` nearest to the unit ``probe``."""
        from ..query.retrieval import exact_search, index_search

        comps = self._search_components(components)
        if self.use_index():
            hits = index_search(self.index(comps), probe, n, exclude, self.cfg.nprobes)
            how = "Lance IVF_FLAT index (cosine)"
        else:
            hits = exact_search(self.st, comps, probe, n, exclude, self.aligner)
            how = "exact scan"
        self.remember([h[0] for h in hits], [h[1] for h in hits])
        return hits, how

    def neighbours_of_id(self, components, image_id: str, n: int):
        """Neighbours of a store image (left out of its own list). With the vector index, the probe's
        vector comes from the index (an id lookup), else from the store."""
        if self.use_index():
            ds = self.index(components)
            t = ds.to_table(filter=f"image_id = {_sql_str(image_id)}", columns=["image_id", "uri", "vector"])
            if t.num_rows == 0:
                raise InputError(f"image {image_id!r} is not in the store")
            probe = np.asarray(t.column("vector")[0].as_py(), np.float32)
            self.remember([image_id], [t.column("uri")[0].as_py()])
        else:
            probe = self.vector_of(image_id, components)
        return self.neighbours(components, probe, n, exclude=(image_id,))

    def text_neighbours(self, components: Sequence[str], text: str, n: int) -> list:
        """Images ranked by ``⟨Σ_k f_k(c_k), t⟩`` for the text's embedding (``query retrieve --text``)."""
        from ..query.retrieval import retrieve_by_text

        comps = self._search_components(components)
        hits, _ = retrieve_by_text(self.st, comps, text, self.text_model(), n, self.aligner,
                                   cache_dir=self.cfg.text_cache)
        self.remember([h[0] for h in hits], [h[1] for h in hits])
        return hits

    def extremes(self, component: str, direction: np.ndarray, n: int) -> tuple[list, list]:
        """Top and bottom ``n`` images by ``⟨f_k(c_k), u⟩`` — one streamed pass, two bounded heaps."""
        from ..fit.compalign import aligned_batches

        comp = self._search_components([component])
        top: list = []
        bottom: list = []
        u = np.asarray(direction, np.float64)
        for b in aligned_batches(self.st, self.aligner, components=comp, columns=["uri"]):
            s = b.contributions[:, 0].astype(np.float64) @ u
            uris = b.columns["uri"].to_pylist()
            for i in np.argsort(-s)[:n]:
                heapq.heappush(top, (float(s[i]), b.ids[i], uris[i]))
                if len(top) > n:
                    heapq.heappop(top)
            for i in np.argsort(s)[:n]:
                heapq.heappush(bottom, (-float(s[i]), b.ids[i], uris[i]))
                if len(bottom) > n:
                    heapq.heappop(bottom)
        top = [(i, u_, s) for s, i, u_ in sorted(top, reverse=True)]
        bottom = [(i, u_, -s) for s, i, u_ in sorted(bottom, reverse=True)]
        self.remember([h[0] for h in top + bottom], [h[1] for h in top + bottom])
        return top, bottom

    def property_direction(self, prop: str) -> np.ndarray:
        """The unit mean of a property's description embeddings (its direction for top/bottom images)."""
        descs = self.properties[prop]
        e = self.embed_texts(descs) if isinstance(descs[0], str) else np.asarray(descs, np.float64)
        v = e.mean(0)
        return v / max(np.linalg.norm(v), 1e-12)

    # ------------------------------------------------------------------ uploads
    def decode_upload(self, data: bytes):
        """An uploaded file → RGB PIL image (type and size checked by :func:`vitdecomp.images.decode_image`,
        which refuses decompression bombs); never written anywhere."""
        from ..images import decode_image

        if len(data) > self.cfg.max_upload_bytes:
            raise InputError(f"the upload is {len(data)} bytes; the limit is {self.cfg.max_upload_bytes} "
                             "(--max-upload-bytes)")
        if not data:
            raise InputError("the upload is empty: choose an image file")
        return decode_image(data)

    def decompose_image(self, image) -> dict[str, np.ndarray]:
        """One image decomposed with the rebuilt model, as the store was (blocks, heads, convention):
        ``{component: [d] float64}`` in the store's space (aligned when an aligner is given)."""
        import torch

        from ..engine import decompose

        lm = self.model()
        opts = self.manifest["options"]
        x = lm.transform(image)[None].to(next(lm.model.parameters()).device)
        with torch.inference_mode():
            d = decompose(lm, x, blocks=parse_blocks(opts.get("blocks")), heads=bool(opts.get("heads", True)),
                          convention=opts.get("convention", "centered"), normalize=bool(opts.get("normalize")))
        c = d.contributions[0].detach().double().cpu().numpy()
        got = dict(zip(d.names, c))
        missing = [n for n in self.names if n not in got]
        if missing:
            raise InputError(f"the rebuilt model does not produce the store's components {missing[:3]}")
        if self.aligner is not None:
            a = self.aligner
            mapped = a.apply(np.stack([got[n] for n in a.names])[None].astype(np.float32))[0]
            return {n: mapped[i].astype(np.float64) for i, n in enumerate(a.names)}
        return {n: got[n] for n in self.names}

    @staticmethod
    def preview(image, size: int = THUMB) -> str:
        """A data: URI of a re-encoded thumbnail of a decoded upload (the upload's bytes are never echoed)."""
        im = image.copy()
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    # ------------------------------------------------------------------ segmentation
    def head_choices(self) -> list[str]:
        """Heads and attention layers with token maps (from the manifest's components)."""
        out = []
        for c in self.st.components:
            if c.kind == "head":
                if c.path not in out:
                    out.append(c.path)
                out.append(c.name)
            elif c.kind == "attn":
                out.append(c.name)
        return out

    def segmentation(self, image_id: str, component: str, texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
        """Overlay PNG and the patch map ``[gh, gw]`` of a head's (or layer's) token contributions projected
        on one text (topic segmentation) or on the difference of two (contrastive: text₁ − text₂), for a
        store image — the same computation and picture as ``query heatmap``."""
        import torch

        from ..io import read_image
        from ..query.heatmaps import compute_heatmaps, overlay_png, to_display, upsample

        lm = self.model()
        uri = self.uri_of(image_id)
        if uri is None:
            raise InputError(f"image {image_id!r} is not in the store")
        if not uri:
            raise InputError(f"image {image_id!r} has no source URI (it was read from a bytes column)")
        texts = [t for t in texts if t]
        if not texts:
            raise InputError("give a text (topic segmentation) or two (contrastive segmentation)")
        e = self.embed_texts(texts)
        u = e[0] - e[1] if len(e) > 1 else e[0]
        opts = self.manifest["options"]
        x = lm.transform(read_image(uri, self.s3))[None].to(next(lm.model.parameters()).device)
        with torch.inference_mode():
            res = compute_heatmaps(lm, x, [component], u[None], self.aligner, opts.get("convention", "centered"),
                                   parse_blocks(opts.get("blocks")), bool(opts.get("normalize")))
        up = upsample(res.maps, x.shape[-2:])
        target = f"text {texts[0]!r}" if len(texts) == 1 else f"text {texts[0]!r} − text {texts[1]!r}"
        png = overlay_png(to_display(x[0], lm.preprocess), up[0], f"{image_id} — {target}")
        return png, res.maps[0]

    # ------------------------------------------------------------------ query outputs
    def mitigation_names(self) -> list[str]:
        suffix = "_components.parquet"
        return sorted(n[:-len(suffix)] for n in self.query_files
                      if n.endswith(suffix) and n[:-len(suffix)] + ".json" in self.query_files)

    def mitigation(self, name: str) -> dict:
        if name not in self.mitigation_names():
            raise InputError(f"no mitigation result {name!r} in {self.cfg.query}")
        s = _read_json(self.query_files[name + ".json"], self.s3)
        comps = _read_parquet(self.query_files[name + "_components.parquet"], self.s3).to_pylist()
        return {"summary": s, "components": comps}

    def ablation(self) -> Optional[dict]:
        if "ablation.parquet" not in self.query_files:
            return None
        rows = _read_parquet(self.query_files["ablation.parquet"], self.s3).to_pylist()
        summ = _read_json(self.query_files["ablation.json"], self.s3) if "ablation.json" in self.query_files else {}
        return {"rows": rows, "summary": summ}

    def ablation_effects(self, component: str) -> list[dict]:
        """What the query outputs know about ablating ``component``: its mitigation rank/score and whether
        it was ablated, and the accuracy change when its layer alone is mean-ablated."""
        from ..engine import names as N

        out = []
        for nm in self.mitigation_names():
            for r in self.mitigation(nm)["components"]:
                if r["component"] == component:
                    out.append({"source": nm, "text": f"rank {r['rank']} (score {r['score']:+.4f})"
                                + ("; ablated" if r.get("ablated") else "; not ablated")})
        ab = self.ablation()
        if ab:
            try:
                block = N.parse(component).block
            except (VitdecompError, ValueError, AttributeError):
                block = None
            base = ab["summary"].get("baseline_accuracy")
            for r in ab["rows"]:
                if r.get("curve") == "per_layer" and block is not None and r.get("layer") == str(block) and \
                        component in (r.get("components") or []):
                    out.append({"source": "ablation", "text": f"layer {block} ({r['kind']}) ablated alone: accuracy "
                                f"{r['accuracy']:.4f}" + (f" (baseline {base:.4f})" if base is not None else "")})
        return out

    def interpretability(self) -> Optional[dict]:
        """``--query``'s interpretability outputs, else computed from ``--fit``'s TextSpan texts."""
        if "interpretability.json" in self.query_files and "interpretability.parquet" in self.query_files:
            return {"summary": _read_json(self.query_files["interpretability.json"], self.s3),
                    "rows": _read_parquet(self.query_files["interpretability.parquet"], self.s3).to_pylist(),
                    "source": self.query_files["interpretability.json"]}
        if not self.textspan:
            return None
        from ..query.interpretability import score_heads, vocabularies

        vocab = vocabularies(self.properties)
        rows, summary = score_heads({k: [r["text"] for r in v] for k, v in self.textspan.items()}, vocab)
        return {"summary": {**summary, "properties": list(vocab)}, "rows": rows,
                "source": "computed here from --fit's TextSpan texts and the properties' vocabularies"}
