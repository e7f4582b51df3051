"""The compact store layout (README “Store layout”): attention heads stored as coordinates in a
per-head orthonormal basis derived once from the weights, exactly.

For a ModelPlan family (ViT, DeiT, DINO(v2), EVA, timm/open_clip CLIP ViTs) the pooled stream term
of head ``h`` is ``g1 ⊙ W_O^h v_h`` (``W_O^h [D, dh]`` the head's slice of the out-projection,
``g1`` the LayerScale gain; a sub-norm adds the direction of its centring; under ``uniform`` the
head also carries ``g1 ⊙ b_O / H``). The readout chain (frozen norms, matrices, optional
``1/‖z‖``) maps it by a linear map that differs between images only by a scalar, plus an offset
``O_img [B, d]`` shared by the components with weights ``w_k`` (``centered``: all on ``bias``). So

    c_h = Q_h u_h + w_h · O_img,     u_h = Q_hᵀ (c_h − w_h · O_img)      (Q_h [d, r_h] orthonormal)

``Q_h`` spans the candidate directions pushed through the chain's linear maps; ``r_h ≤ dh + 2``.
A store keeps ``u_h`` (``r_h`` numbers per image, the store's dtype), ``Q_h`` once (``basis.safetensors``,
checksummed in the manifest) and ``O_img`` (column ``chain_offset``) when some compact component has
``w_h ≠ 0``. ``‖u_h‖ = ‖c_h − w_h O‖``, so fp16 coordinates keep the error of full fp16 vectors.

Every basis is verified on random images before it is used (``‖c − recon‖/‖c‖ ≤ 1e-5`` in fp32);
a component whose span is not low-rank or fails the check is stored full. Per-position readouts
(Swin, MaxViT, SigLIP's attention pool) store every component full.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError
from .manifest import FORMAT_VERSION, LAYOUTS, MIN_READER, LayoutError  # noqa: F401 (LayoutError re-exported)

log = logging.getLogger(__name__)

BASIS_FILE = "basis.safetensors"
OFFSET_COLUMN = "chain_offset"
VERIFY_TOL = 1e-5                  # fp32 relative error a basis must reach on the verification images
RANK_TOL = 1e-9                    # singular values below this fraction of the largest are dropped (float64)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CompactLayout:
    """Bases of the compact components: ``bases[name] [d, r]`` (float32, orthonormal columns) and their
    offset weights ``weights[name]`` (the share ``w_k`` of the chain offset; 0 under ``centered``)."""

    bases: dict
    weights: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.bases)

    @property
    def needs_offset(self) -> bool:
        return any(abs(self.weights.get(n, 0.0)) > 0 for n in self.bases)

    def rank(self, name: str) -> int:
        return int(self.bases[name].shape[1])

    def weight(self, name: str) -> float:
        return float(self.weights.get(name, 0.0))

    # ------------------------------------------------------------------ manifest and file
    def to_bytes(self) -> bytes:
        """The basis file (safetensors: one ``[d, r]`` float32 tensor per component name)."""
        from safetensors.numpy import save

        return save({n: np.ascontiguousarray(q, np.float32) for n, q in self.bases.items()})

    def manifest_fields(self, basis_bytes: bytes) -> dict:
        """The manifest's top-level fields of a compact store (``layout``, ``format_version``, ``min_reader``,
        ``compact``: basis file + SHA-256, whether the offset column is stored, per component rank and
        offset weight)."""
        return {"layout": "compact", "format_version": FORMAT_VERSION, "min_reader": MIN_READER,
                "compact": {"basis": BASIS_FILE, "basis_sha256": sha256(basis_bytes),
                            "offset_column": self.needs_offset,
                            "components": {n: {"rank": self.rank(n), "offset_weight": self.weight(n)}
                                           for n in self.bases}}}

    @classmethod
    def from_bytes(cls, data: bytes, entry: Mapping[str, Any], where: str) -> "CompactLayout":
        """Parse the basis file after checking it against the manifest's ``compact`` entry."""
        from safetensors.numpy import load

        want = entry.get("basis_sha256")
        got = sha256(data)
        if got != want:
            raise LayoutError(f"{where}: the basis file {entry.get('basis', BASIS_FILE)} has SHA-256 {got[:16]}…, the "
                              f"manifest records {str(want)[:16]}…: it was changed or damaged after the store was "
                              "written; restore it from a backup (rows cannot be read without it)")
        tensors = load(data)
        comps = entry.get("components", {})
        missing = [n for n in comps if n not in tensors]
        if missing:
            raise LayoutError(f"{where}: the basis file lacks {missing[:3]} that the manifest lists as compact")
        return cls({n: tensors[n].astype(np.float32, copy=False) for n in comps},
                   {n: float(v.get("offset_weight", 0.0)) for n, v in comps.items()})

    # ------------------------------------------------------------------ encode / decode
    def encode(self, names: Sequence[str], contributions: np.ndarray,
               offset: Optional[np.ndarray]) -> dict[str, np.ndarray]:
        """``contributions [n, K, d]`` (ordered as ``names``) → ``{name: u [n, r]}`` for the compact
        components (float32, computed in float32 or float64 as the input)."""
        out = {}
        if self.needs_offset and offset is None:
            raise InputError("the store's compact layout needs the chain offset of every image "
                             "(Decomposition.offset); decompose with this vitdecomp")
        for k, name in enumerate(names):
            q = self.bases.get(name)
            if q is None:
                continue
            c = contributions[:, k]
            w = self.weight(name)
            if w:
                c = c - w * offset
            out[name] = (c @ q.astype(c.dtype, copy=False)).astype(np.float32, copy=False)
        return out

    def decode(self, name: str, u: np.ndarray, offset: Optional[np.ndarray], dtype=np.float32) -> np.ndarray:
        """``u [n, r]`` → ``c [n, d]`` (``Q u + w O``)."""
        c = u.astype(dtype, copy=False) @ self.bases[name].T.astype(dtype, copy=False)
        w = self.weight(name)
        if w:
            c += w * offset.astype(dtype, copy=False)
        return c

    def residual(self, names: Sequence[str], contributions: np.ndarray, offset: Optional[np.ndarray]) -> dict:
        """Per compact component the max relative error ``‖c − decode(encode(c))‖/‖c‖`` over images."""
        enc = self.encode(names, contributions, offset)
        out = {}
        for k, name in enumerate(names):
            if name not in enc:
                continue
            c = contributions[:, k].astype(np.float64)
            rec = self.decode(name, enc[name].astype(np.float64), offset, np.float64) if offset is None else \
                self.decode(name, enc[name].astype(np.float64), offset.astype(np.float64), np.float64)
            den = np.maximum(np.linalg.norm(c, axis=-1), 1e-30)
            out[name] = float((np.linalg.norm(c - rec, axis=-1) / den).max())
        return out


# ------------------------------------------------------------------------------ derivation
def _out_projection(rule) -> tuple[Any, Any, Any]:
    """``(weight [D, H·dh], bias [D] | None, sub-norm γ [H·dh] | None | "ones")`` of an attention rule's module."""
    m = rule.module
    proj = getattr(m, "proj", None) or getattr(m, "out_proj", None)
    if proj is None or getattr(proj, "weight", None) is None:
        return None, None, None
    sub = getattr(rule, "subnorm", None)
    gamma = None
    if sub is not None and getattr(sub, "kind", "identity") != "identity":
        gamma = sub.weight if sub.weight is not None else "ones"
    return proj.weight, proj.bias, gamma


def _chain_maps(post, d_in: int, convention: str, dtype):
    """The linear parts of the readout chain's maps (evaluated at an arbitrary total: the maps differ
    between images only by scalar factors, so their images of a span do not depend on the total)."""
    import torch

    from ..engine.rules.affine import matrix_map, norm_map

    gen = torch.Generator().manual_seed(0)
    total = torch.randn(1, d_in, generator=gen, dtype=dtype)
    maps = []
    for op in post:
        if op.spec is not None:
            m, total = norm_map(op.spec, total, convention)
        else:
            m, total = matrix_map(op.weight, op.bias, total)
        maps.append(m.linear)
    return maps


def _orthonormal(p: np.ndarray) -> np.ndarray:
    """``p [n, d]`` (rows span a subspace) → ``[d, r]`` orthonormal basis of that span (float64 SVD)."""
    u, s, _ = np.linalg.svd(p.T, full_matrices=False)
    keep = s > (s[0] if len(s) else 0) * RANK_TOL
    return u[:, keep]


def derive_layout(lm, components: Sequence, convention: str = "centered", normalize: bool = False, *,
                  verify: bool = True, images: Any = None) -> tuple[Optional[CompactLayout], dict]:
    """Bases of every attention head of ``lm`` (loaded weights) that the compact layout can store.

    Returns ``(layout or None, report)``; ``report`` has ``compact`` (names), ``full`` (name → why) and
    ``max_error`` (the verification's worst relative error). A family without a low-rank form (per-position
    readouts) gives ``None`` (every component full), said once in the log. ``verify`` decomposes
    ``images`` (default: two seeded random images) and keeps only bases whose reconstruction error is
    ≤ 1e-5 (fp32).
    """
    import torch

    from ..engine.engine import _offset_weights, _unwrap
    from ..engine.rules.models import plan_for
    from ..engine.rules.spatial import SpatialPlan

    net = _unwrap(lm)
    plan = plan_for(net)
    report: dict = {"compact": [], "full": {}, "max_error": 0.0}
    heads = [c for c in components if c.kind == "head"]
    if isinstance(plan, SpatialPlan) or not heads:
        why = "per-position readout (no low-rank form)" if heads else "no attention heads are stored"
        for c in components:
            report["full"][c.name] = why
        log.info("compact layout: %s for %s; every component is stored full", why, type(net).__name__)
        return None, report
    f64 = torch.float64
    param = next(net.parameters())
    rules = {rule.attn_path: (i, rule) for i, _, _, rule in plan.blocks}
    maps = None
    heads_per_path: dict[str, int] = {}
    for c in heads:
        heads_per_path[c.path] = heads_per_path.get(c.path, 0) + 1
    w_all = _offset_weights(list(components), convention, None, torch.float64)
    weights = {c.name: float(w_all[k]) for k, c in enumerate(components)}
    bases: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for c in heads:
            i, rule = rules.get(c.path, (None, None))
            W, b, gsub = _out_projection(rule.attn) if rule is not None else (None, None, None)
            if W is None:
                report["full"][c.name] = "no out-projection weight found"
                continue
            W = W.detach().to(f64)
            D = W.shape[0]
            H, dh = rule.attn.num_heads, rule.attn.head_dim
            if maps is None:
                maps = _chain_maps(plan.post, D, convention, f64)
            g1 = rule.gain1.detach().to(f64) if rule.gain1 is not None else torch.ones(D, dtype=f64)
            cand = [W[:, c.head * dh:(c.head + 1) * dh].T]                        # [dh, D]
            if gsub is not None:                                                  # the sub-norm's centring
                gam = torch.ones(W.shape[1], dtype=f64) if isinstance(gsub, str) else gsub.detach().to(f64)
                cand.append((W @ gam)[None])
            if convention == "uniform":                                         # the head's bias share
                if b is not None:
                    cand.append(b.detach().to(f64)[None] / H)
                sub = getattr(rule.attn, "subnorm", None)
                if gsub is not None and getattr(sub, "bias", None) is not None:
                    cand.append((W @ sub.bias.detach().to(f64))[None] / H)
            x = torch.cat(cand, 0) * g1                                           # [n, D] stream directions
            x = x[None]
            for lin in maps:
                x = lin(x)
            p = x[0].numpy()
            q = _orthonormal(p)
            if q.shape[1] * 2 > q.shape[0]:
                report["full"][c.name] = f"rank {q.shape[1]} is not low (d = {q.shape[0]})"
                continue
            bases[c.name] = q.astype(np.float32)
    if not bases:
        return None, report
    layout = CompactLayout(bases, {n: weights[n] for n in bases})
    if verify:
        from ..engine import decompose

        if images is None:
            h, w = getattr(lm, "image_size", (224, 224))
            gen = torch.Generator().manual_seed(7)
            images = torch.randn(2, 3, h, w, generator=gen).to(param.device, param.dtype)
        with torch.inference_mode():
            dec = decompose(lm, images, blocks=_blocks_of(components), heads=True, convention=convention,
                            normalize=normalize)
        contrib = dec.contributions.double().cpu().numpy()
        off = dec.offset.double().cpu().numpy() if dec.offset is not None else None
        errs = layout.residual(dec.names, contrib, off)
        bad = {n: e for n, e in errs.items() if not e <= VERIFY_TOL}
        for n, e in bad.items():
            report["full"][n] = f"basis check failed (relative error {e:.2e} > {VERIFY_TOL:g})"
        if bad:
            log.warning("compact layout: %d heads failed the basis check and are stored full (worst %s: %.2e)",
                        len(bad), max(bad, key=bad.get), max(bad.values()))
            layout = CompactLayout({n: q for n, q in bases.items() if n not in bad},
                                   {n: weights[n] for n in bases if n not in bad})
        report["max_error"] = max([e for n, e in errs.items() if n not in bad], default=0.0)
        if not layout.bases:
            return None, report
    report["compact"] = layout.names
    others = [c.name for c in components if c.name not in layout.bases and c.name not in report["full"]]
    for n in others:
        report["full"][n] = "embed, MLP and bias components are stored full"
    log.info("compact layout: %d heads as coordinates (ranks %s), %d components full; basis check max error %.1e",
             len(layout.bases), sorted({layout.rank(n) for n in layout.bases}), len(components) - len(layout.bases),
             report["max_error"])
    return layout, report


def _blocks_of(components: Sequence) -> Optional[list[int]]:
    blocks = sorted({c.block for c in components if c.block is not None})
    return blocks or None


def layout_for_run(cfg, store, components: Sequence) -> tuple[dict, Optional[bytes]]:
    """The layout fields of the decompose job's manifest and the basis file to write.

    A store that exists keeps its own layout (a different ``layout`` option is a logged no-op: rows of
    one store are all written one way). A new store gets ``cfg.layout``; ``compact`` loads the weights on
    the driver once, derives and verifies the bases (:func:`derive_layout`) and falls back to ``full``
    (said in the log) when no component can use it.
    """
    want = getattr(cfg, "layout", "full")
    if store.exists():
        have = store.manifest.get("layout", "full")
        if have != want:
            log.warning("%s was written with layout %s; it keeps that layout (the layout option %s applies to new "
                        "stores only)", store.uri, have, want)
        return {k: store.manifest[k] for k in ("layout", "format_version", "min_reader", "compact")
                if k in store.manifest}, None
    if want == "full" or getattr(cfg, "readout_only", False):
        return {}, None
    from ..models import load_model

    lm = load_model(cfg.model, pretrained=cfg.pretrained or False, checkpoint=cfg.checkpoint, device="cpu",
                    seed=getattr(cfg, "seed", 0))
    layout, _ = derive_layout(lm, components, cfg.convention, cfg.normalize)
    if layout is None:
        log.info("layout compact: no component of %s can be stored as coordinates; the store uses the full layout",
                 cfg.model)
        return {}, None
    data = layout.to_bytes()
    return layout.manifest_fields(data), data


def build_manifest(lm, components: Optional[Sequence] = None, options: Any = None, *, layout: str = "compact",
                   **build_kw) -> tuple[Any, Optional[bytes]]:
    """:meth:`Manifest.build` plus the layout: ``(manifest, basis bytes or None)`` for
    ``Store.create(uri, manifest, basis=basis)``. ``lm`` must have its weights (the bases come from them);
    ``layout="compact"`` falls back to full when no component can use it (said in the log)."""
    from ..config import DecomposeOptions, parse_blocks
    from ..engine import components_for
    from .manifest import Manifest

    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    options = DecomposeOptions() if options is None else options
    if components is None:
        components = components_for(lm, blocks=parse_blocks(getattr(options, "blocks", None)),
                                    heads=bool(getattr(options, "heads", True)))
    fields, data = {}, None
    if layout == "compact" and not build_kw.get("readout_only"):
        lay, _ = derive_layout(lm, components, getattr(options, "convention", "centered"),
                               bool(getattr(options, "normalize", False)))
        if lay is not None:
            data = lay.to_bytes()
            fields = lay.manifest_fields(data)
    return Manifest.build(lm, components, options, layout_fields=fields, **build_kw), data


# ------------------------------------------------------------------------------ coefficient space
def table_parts(t, names: Sequence[str], layout: Optional[CompactLayout], dtype=np.float64):
    """A raw store table (``Store.to_ray(coefficients=True)`` blocks) → ``(coefficients, full, offset)``
    as :meth:`Store.iter_batches` ``(coefficients=True)`` gives them."""
    from .schema import arrow_to_vectors, column_for

    coef, full = {}, {}
    for n in names:
        v = arrow_to_vectors(t.column(column_for(n)), dtype)
        (coef if layout is not None and n in layout.bases else full)[n] = v
    off = arrow_to_vectors(t.column(OFFSET_COLUMN), dtype) if OFFSET_COLUMN in t.column_names else None
    return coef, full, off


class CoefficientMap:
    """``⟨c_k, m_a⟩`` for every component ``k`` and row ``m_a`` of ``M [A, d]``, computed from the stored
    coordinates: ``u_k · (Q_kᵀ m_a) + w_k ⟨O, m_a⟩`` (compact) or ``c_k · m_a`` (full). ``[b, K, A]`` float64."""

    def __init__(self, layout: Optional[CompactLayout], names: Sequence[str], M: np.ndarray):
        self.names = list(names)
        self.M = np.asarray(M, np.float64)
        self.layout = layout
        self.proj = {n: layout.bases[n].astype(np.float64).T @ self.M.T for n in self.names
                     if layout is not None and n in layout.bases}                         # [r, A]
        self.w = {n: layout.weight(n) for n in self.proj}

    def __call__(self, coef: Mapping[str, np.ndarray], full: Mapping[str, np.ndarray],
                 offset: Optional[np.ndarray]) -> np.ndarray:
        first = next(iter(coef.values()), None)
        b = (first if first is not None else next(iter(full.values()))).shape[0]
        out = np.empty((b, len(self.names), self.M.shape[0]), np.float64)
        off = offset @ self.M.T if offset is not None and any(self.w.values()) else None
        for k, n in enumerate(self.names):
            if n in self.proj:
                out[:, k] = coef[n] @ self.proj[n]
                if self.w[n]:
                    out[:, k] += self.w[n] * off
            else:
                out[:, k] = full[n] @ self.M.T
        return out


class CoefficientMoments:
    """Mergeable TextSpan moments accumulated in coefficient space (README “Store layout”).

    Compact component ``k``: ``Σu``, ``UᵀU [r, r]`` and, when it has an offset share, ``UᵀO [r, d]``;
    shared ``ΣO``, ``OᵀO``; full components: ``Σx``, ``XᵀX``. :meth:`moments` maps them once:
    ``XᵀX = Q UᵀU Qᵀ + w (Q UᵀO + (Q UᵀO)ᵀ) + w² OᵀO``, ``Σx = Q Σu + w ΣO``."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.n = 0
        self.acc: dict = {}
        self.shift: dict = {}           # add32: ("u"|"x", name) / ("o", "") → the float64 reference row subtracted

    def _add(self, key, value) -> None:
        self.acc[key] = value if key not in self.acc else self.acc[key] + value

    def add32(self, coef: Mapping[str, np.ndarray], full: Mapping[str, np.ndarray], offset: Optional[np.ndarray],
              layout: Optional[CompactLayout]) -> "CoefficientMoments":
        """:meth:`add` for streamed blocks (:func:`vitdecomp.store.stream.stream_parts`, float64 or float32;
        modified in place): each block is shifted by a fixed reference row (its first row seen) and its Gram
        matrix is one BLAS product in the block's dtype whose ``[w, w]`` result is summed in float64;
        :meth:`_plain` undoes the shift exactly in float64. The shift keeps the products at the scale of
        the spread, not of the mean (what makes float32 blocks usable; tested)."""
        from .stream import sum64

        plain = bool(self.acc) and not self.shift      # float64 sums from add() already there: no shift
        b = 0
        use_off = offset is not None and layout is not None and any(layout.weight(n) for n in coef)

        def shifted(kind: str, name: str, x: np.ndarray) -> np.ndarray:
            key = (kind, name)
            if plain:
                return x
            if key not in self.shift:
                self.shift[key] = x[0].astype(np.float64)
            x -= self.shift[key].astype(x.dtype)
            return x

        o = shifted("o", "", offset) if use_off else None
        for n in self.names:
            if n in coef:
                u = shifted("u", n, coef[n])
                b = u.shape[0]
                self._add(("su", n), sum64(u))
                self._add(("uu", n), (u.T @ u).astype(np.float64))
                if layout.weight(n) and o is not None:
                    self._add(("uo", n), (u.T @ o).astype(np.float64))
            else:
                x = shifted("x", n, full[n])
                b = x.shape[0]
                self._add(("sx", n), sum64(x))
                self._add(("xx", n), (x.T @ x).astype(np.float64))
        if o is not None:
            self._add(("so", ""), sum64(o))
            self._add(("oo", ""), (o.T @ o).astype(np.float64))
        self.n += b
        return self

    def _plain(self) -> dict:
        """The accumulators without :meth:`add32`'s shifts (float64): for ``a' = a − a₀``,
        ``Σa bᵀ = Σa'b'ᵀ + a₀(Σb')ᵀ + (Σa')b₀ᵀ + n a₀b₀ᵀ`` and ``Σa = Σa' + n a₀``."""
        sh = self.shift
        if not sh:
            return dict(self.acc)
        a, n, out = self.acc, self.n, dict(self.acc)

        def zero(like):
            return np.zeros_like(like)

        def second(skey, akey, a0, bkey, b0):
            sa, sb = a[akey] if akey in a else None, a[bkey] if bkey in a else None
            a0 = zero(sa) if a0 is None else a0
            b0 = zero(sb) if b0 is None else b0
            out[skey] = a[skey] + np.outer(a0, sb) + np.outer(sa, b0) + n * np.outer(a0, b0)

        o0 = sh.get(("o", ""))
        for name in self.names:
            for kind, s1, s2 in (("u", "su", "uu"), ("x", "sx", "xx")):
                if (s1, name) in a:
                    z0 = sh.get((kind, name))
                    second((s2, name), (s1, name), z0, (s1, name), z0)
                    if kind == "u" and ("uo", name) in a:
                        second(("uo", name), (s1, name), z0, ("so", ""), o0)
                    if z0 is not None:
                        out[(s1, name)] = a[(s1, name)] + n * z0
        if ("so", "") in a:
            second(("oo", ""), ("so", ""), o0, ("so", ""), o0)
            if o0 is not None:
                out[("so", "")] = a[("so", "")] + n * o0
        return out

    def add(self, coef: Mapping[str, np.ndarray], full: Mapping[str, np.ndarray], offset: Optional[np.ndarray],
            layout: Optional[CompactLayout]) -> "CoefficientMoments":
        if self.shift:
            self.acc, self.shift = self._plain(), {}
        b = None
        for n in self.names:
            if n in coef:
                u = np.asarray(coef[n], np.float64)
                b = u.shape[0]
                self._add(("su", n), u.sum(0))
                self._add(("uu", n), u.T @ u)
                if layout.weight(n) and offset is not None:
                    self._add(("uo", n), u.T @ np.asarray(offset, np.float64))
            else:
                x = np.asarray(full[n], np.float64)
                b = x.shape[0]
                self._add(("sx", n), x.sum(0))
                self._add(("xx", n), x.T @ x)
        if offset is not None and layout is not None and any(layout.weight(n) for n in coef):
            o = np.asarray(offset, np.float64)
            self._add(("so", ""), o.sum(0))
            self._add(("oo", ""), o.T @ o)
        self.n += b or 0
        return self

    def __add__(self, other: "CoefficientMoments") -> "CoefficientMoments":
        out = CoefficientMoments(self.names)
        out.n = self.n + other.n
        for src in (self._plain(), other._plain()):
            for k, v in src.items():
                out._add(k, v)
        return out

    def to_bytes(self) -> bytes:
        import pickle

        return pickle.dumps((self.names, self.n, self._plain()), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CoefficientMoments":
        import pickle

        names, n, acc = pickle.loads(data)
        out = cls(names)
        out.n, out.acc = n, acc
        return out

    def moments(self, layout: Optional[CompactLayout], d: int) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, sum [K, d], xtx [K, d, d])`` in model space (float64)."""
        K = len(self.names)
        s = np.zeros((K, d))
        xtx = np.zeros((K, d, d))
        acc = self._plain()
        so, oo = acc.get(("so", "")), acc.get(("oo", ""))
        for k, n in enumerate(self.names):
            if ("su", n) in acc:
                Q = layout.bases[n].astype(np.float64)
                w = layout.weight(n)
                s[k] = Q @ acc[("su", n)]
                xtx[k] = Q @ acc[("uu", n)] @ Q.T
                if w and so is not None:
                    cross = Q @ acc[("uo", n)]
                    s[k] += w * so
                    xtx[k] += w * (cross + cross.T) + w * w * oo
            elif ("sx", n) in acc:
                s[k], xtx[k] = acc[("sx", n)], acc[("xx", n)]
        return self.n, s, xtx
