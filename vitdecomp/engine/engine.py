"""The decomposition engine: hooks in, one forward pass of the unmodified model, contributions out.

``z = Σ_k c_k`` exactly (README “How it works, and what it costs”): every component's branch output is pooled over the readout
positions as the model runs, carried through the branch gains (LayerScale) and then through the
frozen affine readout chain (final norm, pooled norm, projection, optional L2 normalisation).
Memory is O(B·K·D) plus the requested token maps.

One path for every family (README “Writing a rule”): :func:`~.rules.models.plan_for` resolves the
model's rules; :func:`as_positions` turns any plan into units (one per residual branch, from the
block rules) and frozen per-position readout weights. A CLS token or mean pooling is the static
case — weights known before the forward pass, so units pool inside their hooks and attention rules
compute only the readout query's row — while attention pools, per-token norms, Swin and MaxViT
keep per-position branch outputs until the forward pass has fixed their weights. :func:`_assemble`
carries both through the readout the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import names as N
from ..errors import InputError
from .names import Component
from .rules.affine import CONVENTIONS, apply_map, matrix_map, norm_map
from .rules.attention import AttnResult
from .rules.context import RuleContext
from .rules.models import ModelPlan, plan_for
from .rules.spatial import PrefixStore, ReadoutMaps, SpatialPlan, Unit, pool_positions

log = logging.getLogger(__name__)


@dataclass
class Decomposition:
    """Result of :func:`decompose`.

    ``contributions [B, K, d]`` (float32, or float64 for a float64 model) sum over ``K`` to
    ``readout [B, d]``, the upstream model's own output. ``tokens[name]`` is ``[B, N, d]`` over all
    ``N`` sequence positions (prefix tokens first) and sums over ``N`` to ``self[name]``: source
    tokens of the readout query for CLS/mean-pooled ViTs; for per-position readouts (attention
    pool, Swin, MaxViT) the head's direct effect at each position of its stream, ``N = gh·gw`` of its
    stage in image coordinates (``token_grids[name]``), see :meth:`token_map`.

    ``offset [B, d]``: the readout chain's total offset (its maps' offsets carried through the later
    maps, divided by ``‖z‖`` when normalised); component ``k`` holds ``w_k · offset`` of it (``w``: the
    convention's offset weights). The compact store layout uses it (:mod:`vitdecomp.store.compact`).

    ``pool_heads [B, Hp, d]`` (attention-pool readouts, SigLIP): a second, coarser view of the same
    readout — the pool's attention output per pool head (values of the real last stream, value bias
    included), carried through the linear part of the readout chain. With the pool's
    out-projection bias and ``attn_pool.mlp`` they sum to the readout (before the chain's offsets).
    """

    names: list[str]
    components: list[Component]
    contributions: Tensor
    readout: Tensor
    tokens: dict[str, Tensor]
    convention: str
    normalized: bool
    num_prefix_tokens: int
    grid: tuple[int, int]
    diagnostics: dict = field(default_factory=dict)
    token_grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    pool_heads: Optional[Tensor] = None
    offset: Optional[Tensor] = None

    def index(self, name: str) -> int:
        return N.select(self.names, [name])[0]

    def __getitem__(self, name: str) -> Tensor:
        """Contribution of one component, ``[B, d]``."""
        return self.contributions[:, self.index(name)]

    def residual(self) -> Tensor:
        """Relative reconstruction error ``‖Σ_k c_k − z‖ / ‖z‖`` per image, ``[B]``."""
        err = (self.contributions.sum(1) - self.readout).norm(dim=-1)
        return err / self.readout.norm(dim=-1).clamp_min(torch.finfo(self.readout.dtype).tiny)

    def top(self, image: int = 0, n: int = 10, direction: Optional[Tensor] = None) -> list[tuple[str, float]]:
        """The ``n`` largest components of one image.

        Without ``direction``, by their projection on the readout direction ``⟨c_k, z⟩/‖z‖`` (the
        terms sum to ``‖z‖``); with ``direction [d]``, by ``⟨c_k, direction⟩``.
        """
        c = self.contributions[image]
        d = self.readout[image] / self.readout[image].norm() if direction is None else direction.to(c)
        score = c @ d
        order = score.abs().argsort(descending=True)[:n]
        return [(self.names[i], float(score[i])) for i in order]

    def pool_view(self) -> "Decomposition":
        """The attention-pool (SigLIP MAP) readout decomposed at the pool itself: one component per pool
        head, ``attn_pool.head.<p>`` (the latent query's attention output of head ``p`` over the real
        last stream, value bias included, carried through the readout chain), ``attn_pool.mlp``, and
        ``bias`` (the out-projection bias and the chain's offsets: input-independent). Exact: the three
        sum to the readout. Every upstream block acts only through the pool's attention here, so it
        has no direct effect of its own; the default view carries each upstream component through
        the pool's frozen attention instead."""
        if self.pool_heads is None:
            raise InputError("pool_view() needs an attention-pool readout (SigLIP's MAP head); this model has none")
        mlp = [i for i, c in enumerate(self.components) if c.kind == "mlp" and c.path.endswith("attn_pool.mlp")]
        path = self.components[mlp[0]].path.rsplit(".mlp", 1)[0] if mlp else "attn_pool"
        heads = [Component(f"{path}.head.{p}", "head", path, None, p) for p in range(self.pool_heads.shape[1])]
        parts = [self.pool_heads] + ([self.contributions[:, mlp]] if mlp else [])
        rest = torch.cat(parts, 1)
        bias = self.readout - rest.sum(1)
        comps = heads + [self.components[i] for i in mlp] + [Component(N.BIAS, "bias", "")]
        return Decomposition(names=[c.name for c in comps], components=comps,
                             contributions=torch.cat([rest, bias[:, None]], 1), readout=self.readout, tokens={},
                             convention=self.convention, normalized=self.normalized,
                             num_prefix_tokens=self.num_prefix_tokens, grid=self.grid,
                             diagnostics={"view": "attention pool"})

    def token_map(self, name: str) -> Tensor:
        """Per-patch contributions of a token-decomposed component in image coordinates, ``[B, gh, gw, d]``.

        Prefix tokens (class, registers) are dropped; row ``i``, column ``j`` is the patch at that
        place in the image. Hierarchical models (Swin, MaxViT) give the grid of the component's
        stage (window partitions, grid partitions and cyclic shifts undone): cell ``(i, j)`` covers
        the image rectangle ``[i·s, (i+1)·s) × [j·s, (j+1)·s)`` with ``s`` the stage's stride.
        """
        if name not in self.tokens:
            raise InputError(f"no token contributions for {name!r}; pass tokens=[{name!r}] to decompose()")
        grid = self.token_grids.get(name, self.grid)
        t = self.tokens[name][:, self.num_prefix_tokens:]
        return t.reshape(t.shape[0], *grid, t.shape[-1])


_Ctx = RuleContext  # old private name, kept for code written against it


def _unwrap(model) -> nn.Module:
    """The ``nn.Module`` to decompose: ``model`` itself, or a :class:`~vitdecomp.models.LoadedModel`'s ``.model``."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise InputError(f"expected a torch nn.Module or a LoadedModel, got {type(model).__qualname__} "
                     f"({_short_repr(model)}); pass the model itself or vitdecomp.load_model('timm:<name>')")


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def select_blocks(n_blocks: int, blocks: Optional[Iterable[int]]) -> list[int]:
    """Validate a block selection: a contiguous run ending at the last block (negatives allowed)."""
    if blocks is None:
        return list(range(n_blocks))
    try:
        sel = sorted({int(b) + (n_blocks if int(b) < 0 else 0) for b in blocks})
    except (TypeError, ValueError):
        raise InputError(f"blocks must be a sequence of block indices, got {blocks!r}") from None
    if not sel or sel[0] < 0 or sel[-1] >= n_blocks:
        raise InputError(f"blocks {list(blocks)} out of range: the model has blocks 0..{n_blocks - 1}")
    if sel != list(range(sel[0], n_blocks)):
        raise InputError(f"blocks {sel} must be a contiguous run ending at the last block ({n_blocks - 1}), "
                         f"e.g. range({sel[0]}, {n_blocks}); earlier blocks fold into 'embed'")
    return sel


def _blocks_of(plan, blocks) -> list[int]:
    """``blocks`` as indices; a string names the first decomposed block by its module path."""
    if isinstance(blocks, str):
        paths = [b[1] for b in plan.blocks]
        if blocks not in paths:
            import difflib
            raise InputError(f"blocks={blocks!r} is neither block indices nor a block path of this model; close matches: "
                             f"{difflib.get_close_matches(blocks, paths, n=3) or paths[:3]}")
        blocks = range(paths.index(blocks), len(paths))
    return select_blocks(len(plan.blocks), blocks)


def block_paths(model) -> list[str]:
    """Module paths of the model's blocks, in order (index = the ``blocks`` option's index)."""
    return [b[1] for b in plan_for(_unwrap(model)).blocks]


def components_for(model, blocks: Optional[Union[Iterable[int], str]] = None, heads: bool = True) -> list[Component]:
    """The component list :func:`decompose` would return, without running the model."""
    plan = as_positions(plan_for(_unwrap(model)))
    return _components(plan, _blocks_of(plan, blocks), heads)


def _offset_weights(components: list[Component], convention: str, heads_per_block: Optional[dict] = None,
                    dtype=torch.float32, device=None) -> Tensor:
    """``w [K]``, Σ w = 1: who receives input-independent offsets (β, biases, uniform mean share).

    ``uniform``: every layer-level slot (embedding, attention layer, MLP, conv branch) gets ``1/K``;
    an attention layer's share is split evenly over its heads (counted per attention path, so
    blocks with two attention layers — MaxViT — are two slots).
    """
    if convention == "centered":
        w = [1.0 if c.kind == "bias" else 0.0 for c in components]
    else:
        heads_per_path: dict[str, int] = {}
        for c in components:
            if c.kind == "head":
                heads_per_path[c.path] = heads_per_path.get(c.path, 0) + 1
        slots = sum(c.kind in ("embed", "attn", "mlp", "conv") for c in components) + len(heads_per_path)
        w = [0.0 if c.kind == "bias" else
             1.0 / (slots * heads_per_path[c.path]) if c.kind == "head" else 1.0 / slots
             for c in components]
    return torch.tensor(w, dtype=dtype, device=device)


def _check_images(images, plan: ModelPlan) -> None:
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a float tensor (B, 3, H, W), got {type(images).__name__}; "
                         "preprocess PIL images with the model's transform first")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}"
                         + ("; add a batch dimension with images[None]" if images.dim() == 3 else ""))
    if not images.is_floating_point():
        raise InputError(f"images must be a float tensor (normalised pixels), got dtype {images.dtype}")
    plan.check_input(images)


def decompose(
    model,
    images: Tensor,
    *,
    blocks: Optional[Union[Iterable[int], str]] = None,
    heads: bool = True,
    tokens: Optional[Sequence[str]] = None,
    convention: str = "centered",
    normalize: bool = False,
) -> Decomposition:
    """Decompose the readout of ``model`` on ``images`` into additive component contributions.

    Args:
        model: an ``nn.Module`` (timm ViT, open_clip ViT or CLIP) in eval mode, or what
            :func:`vitdecomp.load_model` returns.
        images: preprocessed ``[B, 3, H, W]`` float tensor on the model's device.
        blocks: indices of the decomposed blocks (a run ending at the last block), or the module
            path of the first decomposed block (``"layers.2.blocks.14"``); earlier blocks fold into
            ``embed``. Default: all.
        heads: split attention into heads (``<attn>.head.<h>``) or keep one ``<attn>`` component.
        tokens: component names (heads) whose per-source-token contributions to return.
        convention: ``"centered"`` (default) or ``"uniform"`` (README “How it works, and what it costs”).
        normalize: divide by ``‖z‖`` (CLIP embeddings as used for retrieval).

    Returns:
        :class:`Decomposition` with ``contributions [B, K, d]`` and ``readout [B, d]``.
    """
    net = _unwrap(model)
    if convention not in CONVENTIONS:
        raise InputError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if net.training:
        raise InputError("the model is in training mode (dropout, stochastic depth active); call model.eval() first")
    plan = plan_for(net)
    _check_images(images, plan)
    sel = _blocks_of(plan, blocks)
    param = next(net.parameters())
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    ctx = RuleContext(plan.pooling if isinstance(plan, ModelPlan) else None, dtype, heads, plan.layout, {})
    pplan = as_positions(plan, ctx)
    comps = _components(pplan, sel, heads)
    names = [c.name for c in comps]
    for t in tokens or ():
        c = comps[N.select(names, [t])[0]]
        if c.kind != "head":
            raise InputError(f"token contributions are defined for attention heads; {t!r} is a {c.kind} "
                             "(use heads=True and a name like 'blocks.11.attn.head.0')")
        ctx.wanted_tokens.setdefault(c.path, []).append(c.head)

    units = [u for u in pplan.units if u.block in sel]
    store: dict = {}
    first = [b for b in pplan.blocks if b[0] == sel[0]][0]
    handles = []
    try:
        keep = PrefixStore(store, pplan.prefix) if pplan.prefix is not None else store
        handles += pplan.embed_hook(first[2], keep)
        handles += pplan.hooks(store)
        for u in units:
            handles += u.hooks(store if u.name in ctx.wanted_tokens else keep, u.name, ctx)
        with torch.inference_mode():
            z = pplan.readout(images)
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode(), ctx.exact():
        return _assemble(pplan, comps, units, store, z.to(dtype), sel, ctx, convention, normalize,
                         tuple(images.shape[-2:]))


# --------------------------------------------------------------------- one path: readout weights
def as_positions(plan, ctx: Optional[RuleContext] = None) -> SpatialPlan:
    """Any plan as per-position readout weights (the one path every family takes).

    A :class:`ModelPlan`'s CLS token or mean pooling is the *static* special case: one weight
    group whose weights are known before the forward pass, so each unit pools its branch output
    inside its hook (never storing a block's full stream) and attention rules report heads through
    :meth:`AttentionRule.hooks` (only the readout query's attention row per head is computed).
    Units come from the same block rules (:meth:`BlockRule.parts`) as for per-position readouts.
    ``ctx`` is the call's context (None when only the component list is needed).
    """
    if isinstance(plan, SpatialPlan):
        return plan
    pooling = plan.pooling

    def pooled(x: Tensor) -> Tensor:                                   # [B, N, D] stream → [B, 1, D]
        with ctx.exact():
            return pooling.pool(ctx.to_bnd(x).to(ctx.dtype))[:, None]

    def attn_hooks(br):
        def hooks(store, key, ctx_):
            return br.attn.hooks(ctx_, lambda r: store.__setitem__(key, r))
        return hooks

    def branch_hooks(br):
        def hooks(store, key, ctx_):
            return [br.module.register_forward_hook(lambda _, __, out: store.__setitem__(key, pooled(out)))]
        return hooks

    units = []
    for i, _, _, rule in plan.blocks:
        for br in rule.parts():
            if br.kind == "attn":
                units.append(Unit("attn", br.path, "attn", i, 0, attn_hooks(br), br.gain,
                                  br.attn.num_heads, br.attn.head_dim))
            else:
                units.append(Unit("branch", br.path, br.kind, i, 0, branch_hooks(br), br.gain))

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(lambda _, a: store.__setitem__(N.EMBED, pooled(a[0])))]

    def hooks(store):
        return [plan.blocks[-1][2].register_forward_hook(lambda _, __, out: store.__setitem__("final", pooled(out)))]

    def finalize(store, convention, first_level) -> ReadoutMaps:
        total = store["final"][:, 0]
        return ReadoutMaps({0: None}, lambda level, P: P[:, :, 0], torch.zeros_like(total), total, pooled=True)

    return SpatialPlan(
        family=plan.family, root=plan.root, blocks=[b[:3] for b in plan.blocks], units=units, readout=plan.readout,
        check_input=plan.check_input, embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks,
        finalize=finalize, grids=lambda hw: {0: plan.grid(hw)}, num_prefix_tokens=plan.num_prefix_tokens,
        layout=plan.layout, post=list(plan.post), static=pooling)


def _components(plan: SpatialPlan, blocks: Sequence[int], heads: bool) -> list[Component]:
    """Ordered components: ``embed``, per unit (attention heads or attention, MLP, conv), the
    post-stream components (SigLIP's pool MLP), ``bias``."""
    out = [Component(N.EMBED, "embed", "")]
    for u in plan.units:
        if u.block not in blocks:
            continue
        if u.kind == "attn":
            if heads:
                out += [Component(N.head_name(u.name, h), "head", u.name, u.block, h) for h in range(u.num_heads)]
            else:
                out.append(Component(u.name, "attn", u.name, u.block))
        else:
            out.append(Component(u.name, u.ckind, u.name, u.block))
    out += [Component(name, kind, name) for kind, name in plan.extra_components]
    out.append(Component(N.BIAS, "bias", ""))
    return out


def _assemble(plan: SpatialPlan, comps, units, store, z, sel, ctx: RuleContext, convention, normalize, hw):
    """Carry every unit's terms through the frozen readout: pool them with their level's weights
    (static plans pooled them in their hooks already), map the groups to the readout (``lin``),
    distribute the offsets by the convention, then the affine chain ``post``."""
    heads, wanted, dtype = ctx.heads, ctx.wanted_tokens, ctx.dtype
    first_level = plan.level_of_input(sel[0])
    maps = plan.finalize(store, convention, first_level)
    static = maps.pooled
    W = {} if static else {lvl: w.to(dtype) for lvl, w in maps.weights.items()}

    def weights(level: int, n: int) -> Tensor:
        """The level's weights over the first ``n`` positions (units of a ``prefix`` plan keep only those)."""
        w = W[level]
        return w if w.shape[-1] == n else w[..., :n]

    def pooled(level: int, u: Tensor) -> Tensor:
        """Per-position terms ``u [B, N, C]`` (or already pooled ``[B, G, C]``) → ``[B, G, C]``."""
        return u if static else pool_positions(weights(level, u.shape[1]), u.to(dtype))

    def carry(level: int, u: Tensor) -> Tensor:
        """Terms of one component → its contribution ``[B, d]``."""
        return maps.lin(level, pooled(level, u)[:, None])[:, 0]

    def const(level: int, b: Tensor) -> Tensor:
        """A per-position constant ``b [D]`` added to the stream at ``level`` → ``[B, d]``."""
        mass = W[level].sum(-1)                                                   # [B, G]
        return maps.lin(level, (mass[..., None] * b.to(dtype))[:, None])[:, 0]

    # stored per-position outputs are popped as they are pooled, so each is freed once carried
    values: dict[str, Tensor] = {N.EMBED: carry(first_level, store.pop(N.EMBED))}
    bias = maps.offset.clone()
    heads_per_block: dict[int, int] = {}
    raw_tokens: dict[str, tuple] = {}
    diag: dict = {"head_sum_error": {}}
    for u in units:
        x = store.pop(u.name)
        g = u.gain.to(dtype) if u.gain is not None else None
        if u.kind != "attn":
            values[u.name] = carry(u.level, x if g is None else x.to(dtype) * g)
            continue
        if isinstance(x, AttnResult):                   # static readout: the rule pooled and split the heads
            hv, bv = _static_heads(u, x, g, maps, heads, diag)
            if hv is None:
                values[u.name] = bv
                continue
            H = hv.shape[1]
            for h, t in x.tokens.items():
                raw_tokens[N.head_name(u.name, h)] = (u.level, (t if g is None else t * g)[:, :, None], bv / H)
        else:
            H, dh = u.num_heads, u.head_dim
            x = x.to(dtype)                                                       # [B, N, C] image coordinates
            w_o = u.proj.weight.to(dtype).view(-1, H, dh)                         # [D, H, dh]
            if g is not None:
                w_o = w_o * g[:, None, None]
            P = pool_positions(weights(u.level, x.shape[1]), x).view(x.shape[0], -1, H, dh)   # [B, G, H, dh]
            # contiguous: einsum returns a permuted view, and the readout maps' matmuls on a permuted
            # [B, H, G, D] would not fold into one mm (a batched matrix-vector product per head instead)
            per_head = torch.einsum("bghd,ehd->bhge", P, w_o).contiguous()        # [B, H, G, D]
            hv = maps.lin(u.level, per_head)                                      # [B, H, d]
            b_o = u.proj.bias.to(dtype) * (g if g is not None else 1.0) if u.proj.bias is not None else None
            bv = const(u.level, b_o) if b_o is not None else torch.zeros_like(hv[:, 0])
            if not heads:
                values[u.name] = hv.sum(1) + bv
                continue
            # the unsplit out-projection of the same pooled input, compared before the readout map (checks
            # the head split itself at a fraction of a second ``lin``; the branch's real output is checked
            # by the reconstruction of z)
            real = (P.flatten(2) @ w_o.reshape(w_o.shape[0], -1).T).flatten(1)              # [B, G·D]
            diag["head_sum_error"][u.name] = float(((per_head.sum(1).flatten(1) - real).norm(dim=-1)
                                                    / real.norm(dim=-1).clamp_min(1e-30)).max())
            for h in wanted.get(u.name, []):
                terms = x.view(*x.shape[:2], H, dh)[:, :, h] @ w_o[:, h].T          # [B, N, D] head h per position
                raw_tokens[N.head_name(u.name, h)] = (u.level, terms, bv / H)
        heads_per_block[u.block] = H
        if convention == "uniform":                     # the out-projection bias is split evenly over heads
            hv = hv + bv[:, None] / H
        else:
            bias = bias + bv
        for h in range(H):
            values[N.head_name(u.name, h)] = hv[:, h]
    values.update({k: v.to(dtype) for k, v in maps.extra.items()})
    values[N.BIAS] = torch.zeros_like(bias) if convention == "uniform" else bias
    stack = torch.stack([values[c.name] for c in comps], 1)                      # [B, K, d]
    w = _offset_weights(comps, convention, heads_per_block, dtype, z.device)
    if convention == "uniform" and not static:
        stack = stack + w[None, :, None] * maps.offset[:, None, :]
    total = maps.total.to(dtype)
    diag["stream_error"] = float(((stack.sum(1) - total).norm(dim=-1) / total.norm(dim=-1)).max())

    name_idx = {c.name: k for k, c in enumerate(comps)}
    tok = {}
    for name, (level, terms, b_share) in raw_tokens.items():
        k, n = name_idx[name], terms.shape[1]
        if static:                                      # source tokens of the readout query: [B, N, 1, D]
            t = maps.lin(level, terms)
        else:                                           # direct effect of each position, chunked
            t = torch.cat([maps.lin(level, W[level][:, :, s:s + 256].transpose(1, 2)[..., None]
                                    * terms[:, s:s + 256, None, :]) for s in range(0, n, 256)], 1)   # [B, N, d]
        if convention == "uniform":
            t = t + (b_share / n)[:, None] if static else t + (b_share + w[k] * maps.offset)[:, None] / n
        tok[name] = (t, w[k].expand(n) / n)
    ph = maps.pool_heads.to(dtype) if maps.pool_heads is not None else None
    stack, tok, ph, z, offset = _through_chain(list(maps.post) + list(plan.post), total, stack, tok, w, convention,
                                               normalize, z, diag, ph)
    grids = plan.grids(hw)
    unit_level = {u.name: u.level for u in units}
    token_grids = {} if static else {name: grids[unit_level[name.rsplit(".head.", 1)[0]]] for name in tok}
    return Decomposition(
        names=[c.name for c in comps], components=comps, contributions=stack, readout=z,
        tokens={name: t for name, (t, _) in tok.items()}, convention=convention, normalized=normalize,
        num_prefix_tokens=plan.num_prefix_tokens, grid=grids[max(grids)], diagnostics=diag, token_grids=token_grids,
        pool_heads=ph, offset=offset if static else None)


def _static_heads(u: Unit, a: AttnResult, g: Optional[Tensor], maps: ReadoutMaps, heads: bool, diag: dict):
    """An attention rule's pooled report → ``(heads [B, H, d], bias [B, d])``, or ``(None, branch)``
    when heads are off."""
    if not heads:
        return None, maps.lin(u.level, (a.branch if g is None else a.branch * g)[:, None, None])[:, 0]
    recon = a.heads.sum(1) + a.bias
    diag["head_sum_error"][u.name] = float(((recon - a.branch).norm(dim=-1)
                                            / a.branch.norm(dim=-1).clamp_min(1e-30)).max())
    hv = maps.lin(u.level, (a.heads if g is None else a.heads * g)[:, :, None])
    bv = (a.bias if g is None else a.bias * g).expand(hv.shape[0], -1)
    return hv, maps.lin(u.level, bv[:, None, None])[:, 0]


def _through_chain(post, total: Tensor, stack: Tensor, tok: dict, w: Tensor, convention: str, normalize: bool,
                   z: Tensor, diag: dict, extra: Optional[Tensor] = None):
    """Carry the pooled terms ``stack [B, K, D]``, the token terms and an optional extra view
    ``[B, ·, D]`` through the frozen readout chain ``post`` (norms and matrices, offsets shared by
    ``w``; ``total`` is the running readout), then divide by ``‖z‖`` when ``normalize``. Also returns
    the chain's total offset ``[B, d]`` (each map's offset carried through the later maps)."""
    offset = torch.zeros_like(total)
    for op in post:
        if op.spec is not None:
            m, total = norm_map(op.spec, total, convention)
        else:
            m, total = matrix_map(op.weight, op.bias, total)
        stack = apply_map(m, stack, w)
        offset = m.linear(offset) + (m.offset if m.offset is not None else 0)
        tok = {name: (apply_map(m, t, tw), tw) for name, (t, tw) in tok.items()}
        extra = m.linear(extra) if extra is not None else None
    if normalize:
        scale = 1.0 / z.norm(dim=-1)
        stack = stack * scale[:, None, None]
        tok = {name: (t * scale[:, None, None], tw) for name, (t, tw) in tok.items()}
        extra = extra * scale[:, None, None] if extra is not None else None
        offset = offset * scale[:, None]
        z = z * scale[:, None]
    diag["chain_error"] = float(((stack.sum(1) - z).norm(dim=-1) / z.norm(dim=-1)).max())
    return stack, tok, extra, z, offset
