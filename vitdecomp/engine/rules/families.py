"""Per-position readout plans (:mod:`.spatial`): SigLIP attention pool, per-token norm + mean pool,
Swin and MaxViT. Everything is read from the unmodified upstream modules with forward hooks.

No exact-type checks: every block, attention, MBConv branch, merge and pool module is resolved
through the registry (:func:`~.registry.rule_for`, along the MRO), so a registered rule for a
subclass (or a new type) is used here exactly as in a CLS-readout ViT. The block rules for Swin's
``SwinTransformerBlock`` and MaxViT's ``MaxxVitBlock`` / ``PartitionAttentionCl`` live here, with
the ``branch`` rule for ``MbConvBlock``, the ``merge`` rules for ``PatchMerging`` and
``Downsample2d`` and the ``pool`` rule for ``AttentionPoolLatent``; units are built from any
:class:`~.blocks.BlockRule` by :func:`block_units`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...errors import InputError, UnsupportedModuleError
from .registry import register_rule, rule_for
from .affine import NormSpec, PostOp, layernorm_stats
from .blocks import Branch, BlockRule, _gain
from .spatial import ReadoutMaps, SpatialPlan, Unit, norm_linear, norm_offset


def _store_input(store: dict, key: str, convert=lambda t: t):
    def hook(_, args, kwargs=None):
        store[key] = convert(args[0] if args else next(iter(kwargs.values())))
    return hook


def _store_output(store: dict, key: str, convert=lambda t: t):
    def hook(_, __, out):
        store[key] = convert(out)
    return hook


def _linear(path: str, mod: nn.Module) -> nn.Linear:
    if not isinstance(mod, nn.Linear):
        raise UnsupportedModuleError(f"{path}: {type(mod).__qualname__} is not an nn.Linear")
    return mod


def _ln(path: str, mod: nn.Module) -> NormSpec:
    spec = rule_for("norm", path, mod)(mod)
    if spec.kind not in ("layernorm", "rmsnorm", "identity"):
        raise UnsupportedModuleError(f"{path}: norm kind {spec.kind} is not supported here")
    return spec


# ------------------------------------------------------------------------------ units from block rules
def block_units(rule: BlockRule, index: int, level: int) -> list[Unit]:
    """The per-position :class:`Unit` of every branch of a block (any registered block rule)."""
    units = []
    for br in rule.parts():
        if br.kind == "attn":
            a = br.attn
            if getattr(a, "post", None) is not None:      # post-norm branch (Swin V2): frozen per-position σ
                units.append(a.position_unit(br, index, level))
                continue
            # an attention whose out-projection is no nn.Linear (a 1×1 conv, a slice of a concat) gives its
            # per-position matrix as ``out_linear()`` (``weight [D, H·dh]``, ``bias``)
            proj = a.out_linear() if hasattr(a, "out_linear") else _linear(f"{br.path}.proj", a.out_proj())
            units.append(Unit("attn", br.path, "attn", index, level, _attn_hooks(br), br.gain,
                              a.num_heads, a.head_dim, proj))
        else:
            units.append(Unit("branch", br.path, br.kind, index, level, _branch_hooks(br), br.gain))
    return units


def _attn_hooks(br: Branch):
    def hooks(store, key, ctx=None):
        meta: dict = {}

        def sink(t):
            store[key] = t if br.to_positions is None else br.to_positions(t, meta.get("shape"))
        hs = []
        if br.shape_from is not None:
            hs.append(br.shape_from.register_forward_pre_hook(lambda _, a: meta.__setitem__("shape", tuple(a[0].shape))))
        return hs + br.attn.position_hooks(ctx, sink)
    return hooks


def _branch_hooks(br: Branch):
    def hooks(store, key, ctx=None):
        meta: dict = {}

        def on_out(_, __, out):
            store[key] = out if br.to_positions is None else br.to_positions(out, meta.get("shape"))
        hs = []
        if br.shape_from is not None:
            hs.append(br.shape_from.register_forward_pre_hook(lambda _, a: meta.__setitem__("shape", tuple(a[0].shape))))
        return hs + [br.module.register_forward_hook(on_out)]
    return hooks


# ------------------------------------------------------------------------------ timm ViT blocks
def _vit_units(m: nn.Module) -> tuple[list, list[Unit]]:
    blocks, units = [], []
    for i, blk in enumerate(m.blocks):
        path = f"blocks.{i}"
        rule = rule_for("block", path, blk)(path, blk)
        blocks.append((i, path, blk))
        units += block_units(rule, i, 0)
    return blocks, units


# ------------------------------------------------------------------------------ attention pool
class LatentPoolRule:
    """``pool`` rule for timm ``AttentionPoolLatent`` (SigLIP's MAP head) with one latent query.

    ``components``: (kind, name) of the components living after the last stream (the pool's MLP);
    ``hooks(store)``: capture the pool's input, output and MLP output; ``maps(...)``: the frozen
    per-position readout (one weight group per pool head), see :func:`vit_spatial_plan`.
    """

    def __init__(self, path: str, pool: nn.Module):
        if pool.latent_len != 1 or pool.pos_embed is not None:
            raise UnsupportedModuleError(f"{path}: only a single latent query without pool position embedding "
                                         "is decomposed")
        if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
            raise UnsupportedModuleError(f"{path}: q/k norms in the attention pool are not supported yet")
        self.path, self.module = path, pool
        self.components = [("mlp", f"{path}.mlp")] if pool.mlp is not None else []

    def hooks(self, store: dict) -> list:
        pool = self.module
        hs = [pool.register_forward_pre_hook(_store_input(store, "pool_in")),
              pool.register_forward_hook(_store_output(store, "pool_out"))]
        if pool.mlp is not None:
            hs.append(pool.mlp.register_forward_hook(_store_output(store, "pool_mlp")))
        return hs

    def maps(self, store: dict, x: Tensor, mu: Tensor, sigma: Tensor, final: NormSpec, convention: str,
             post: list) -> ReadoutMaps:
        """``x [B, N, D]`` the last stream, ``mu``/``sigma`` its final norm's per-token statistics."""
        pool, dt = self.module, x.dtype
        B, Ntok, D = x.shape
        H, dh = pool.num_heads, pool.head_dim
        y = store["pool_in"].to(dt)                                              # = norm(x), [B, N, D]
        q = torch.nn.functional.linear(pool.latent.to(dt), pool.q.weight.to(dt), _b(pool.q, dt)).reshape(1, H, dh)                                                  # latent_len == 1
        w_kv = pool.kv.weight.to(dt)                     # [2E, D]: the pool's width E may differ from the stream's
        E = w_kv.shape[0] // 2                           # (open_clip's AttentionalPooler, rules/coca.py)
        b_kv = _b(pool.kv, dt) if pool.kv.bias is not None else torch.zeros(2 * E, dtype=dt, device=x.device)
        Np = y.shape[1]                      # the pool sees x[:, start:] (timm drops prefix tokens unless
        start = Ntok - Np                    # pool_include_prefix): their weight is zero
        k = (y @ w_kv[:E].T + b_kv[:E]).view(B, Np, H, dh)
        alpha = torch.zeros(B, H, Ntok, dtype=dt, device=x.device)
        alpha[..., start:] = torch.einsum("hd,bnhd->bhn", q[0], k).mul(pool.scale).softmax(-1)  # [B, H, N]
        w = alpha / sigma[:, None, :, 0]                                         # [B, H, N]
        w_v = w_kv[E:].view(H, dh, D)
        b_v = b_kv[E:].view(H, dh)
        w_o = pool.proj.weight.to(dt).view(-1, H, dh)

        w_v_t = w_v.transpose(1, 2).contiguous()                                 # [H, D, dh], laid out once
        w_o_flat = pool.proj.weight.to(dt)                                       # [D, H·dh]

        def lin(level, P):                                                       # P [B, K, H, D]
            # per pool head a batched matmul, then one mm through the out-projection (einsum here would
            # copy the transposed weights on every call)
            Bk, K = P.shape[:2]
            Pn = norm_linear(final, P, convention).permute(2, 0, 1, 3).reshape(H, Bk * K, D)
            v = torch.bmm(Pn, w_v_t)                                             # [H, B·K, dh]
            return (v.permute(1, 0, 2).reshape(Bk * K, H * dh) @ w_o_flat.T).view(Bk, K, -1)

        o_n = norm_offset(final, mu / sigma, convention)                         # [B, N, D] per-token offset
        o_pool = torch.einsum("bhn,bne->bhe", alpha, o_n)                        # Σ α = 1 per head
        v_off = torch.einsum("bhe,hde->bhd", o_pool, w_v) + b_v
        offset = torch.einsum("bhd,ehd->be", v_off, w_o) + (_b(pool.proj, dt) if pool.proj.bias is not None else 0.0)
        ex = {f"{self.path}.mlp": store["pool_mlp"][:, 0].to(dt)} if pool.mlp is not None else {}
        v_real = (y @ w_kv[E:].T + b_kv[E:]).view(B, Np, H, dh)                # the pool's real values
        heads = torch.einsum("ehd,bhd->bhe", w_o, torch.einsum("bhn,bnhd->bhd", alpha[..., start:], v_real))
        return ReadoutMaps({0: w}, lin, offset, store["pool_out"].to(dt), extra=ex, post=post, pool_heads=heads)


def vit_spatial_plan(m: nn.Module, check, grid) -> SpatialPlan:
    """timm ViT whose readout is an attention pool (SigLIP MAP head) or a per-token final norm
    followed by mean pooling (SigLIP ``gap`` variants).

    Attention pool (``latent_len == 1``): with the pool's attention probabilities ``α_h[n]`` (the
    latent query over every token) and the final norm's per-token ``σ_n`` frozen, the pool's
    attention output is ``Σ_h W_O,h (W_v,h (γ ⊙ C(Σ_n α_h[n] x[n]/σ_n) + β) + b_v,h) + b_O``: linear in
    the last stream with one group per pool head. The pool's MLP (its residual branch) is the
    component ``attn_pool.mlp``; ``fc_norm`` follows as a frozen norm of the pooled vector.
    """
    blocks, units = _vit_units(m)
    npt = m.num_prefix_tokens
    final = _ln("norm", m.norm)
    pool = m.attn_pool
    extra = []
    prule = None
    if pool is not None:
        prule = rule_for("pool", "attn_pool", pool, "is not timm's AttentionPoolLatent")("attn_pool", pool)
        extra = list(prule.components)
        start = 0
    else:
        if m.global_pool != "avg":
            raise UnsupportedModuleError(f"timm ViT global_pool={m.global_pool!r} is not decomposed")
        start = 0 if getattr(m, "pool_include_prefix", False) else npt     # EVA: patches only
    if final.kind == "identity":
        raise UnsupportedModuleError("norm: a per-position readout needs the final norm (this model has none)")
    post = [_post_norm("fc_norm", m.fc_norm)]
    rule_for("scale", "head_drop", m.head_drop)

    def hooks(store):
        hs = [m.norm.register_forward_pre_hook(_store_input(store, "final_in"))]
        if prule is not None:
            hs += prule.hooks(store)
        else:
            hs.append(m.fc_norm.register_forward_pre_hook(_store_input(store, "pool_out")))
        return hs

    def finalize(store, convention, first_level) -> ReadoutMaps:
        x = store["final_in"]
        dt = x.dtype if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        mu, sigma = layernorm_stats(x, final)                                           # [B, N, 1]
        B, Ntok, D = x.shape
        if pool is None:
            n = Ntok - start
            w = torch.zeros(B, 1, Ntok, dtype=dt, device=x.device)
            w[:, 0, start:] = 1.0 / (n * sigma[:, start:, 0])
            offset = norm_offset(final, (mu / sigma)[:, start:], convention).mean(1)

            def lin(level, P):
                return norm_linear(final, P[:, :, 0], convention)
            return ReadoutMaps({0: w}, lin, offset, store["pool_out"].to(dt), post=post)

        return prule.maps(store, x, mu, sigma, final, convention, post)

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed"))]

    def grids(hw):
        return {0: grid(hw)}

    return SpatialPlan(
        family="timm-vit-map" if pool is not None else "timm-vit-gap", root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks, finalize=finalize, grids=grids,
        num_prefix_tokens=npt, extra_components=extra)


def _b(lin: nn.Linear, dt) -> Optional[Tensor]:
    return None if lin.bias is None else lin.bias.to(dt)


def _post_norm(path: str, mod: nn.Module):

    return PostOp(path, spec=rule_for("norm", path, mod)(mod))


# ------------------------------------------------------------------------------ hierarchical helpers
def _nhwc_seq(t: Tensor) -> Tensor:
    """``[B, H, W, C]`` → ``[B, H·W, C]`` (row-major image coordinates)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _nchw_seq(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def _merge_weights(w_next: Tensor, inv: Tensor, hw: tuple[int, int], hw_next: tuple[int, int]) -> Tensor:
    """Swin patch merging, adjoint: weights ``[B, G, N']`` of the merged level (times ``inv [B, N']``,
    the merge norm's ``1/σ``) → ``[B, 4G, N]`` of the finer level. Group ``4g + j`` is slot ``j`` of the
    merge's concatenation, ``j = 2·(x mod 2) + (y mod 2)`` (timm's flatten order)."""
    B, G, _ = w_next.shape
    (h, w), (h2, w2) = hw, hw_next
    s = (w_next * inv[:, None]).view(B, G, h2, w2)
    out = w_next.new_zeros(B, G, 4, h, w)
    for yo in (0, 1):
        for xo in (0, 1):
            part = s[:, :, :(h - yo + 1) // 2, :(w - xo + 1) // 2]
            out[:, :, 2 * xo + yo, yo::2, xo::2] = part
    return out.view(B, 4 * G, h * w)


# ------------------------------------------------------------------------------------------ Swin
def swin_plan(m: nn.Module, family: str = "timm-swin") -> SpatialPlan:
    """timm ``SwinTransformer``: shifted-window attention with relative position bias, patch merging.

    Levels are the stages. Readout ``z = mean_n LN(x_L[n])`` (timm ``pre_logits``). Going back one
    level through a patch merging ``W_red(γ ⊙ C(concat_j x[child_j])/σ' + β)``, every position keeps
    its merge slot ``j``, so the weights of level ``l`` have ``4^(L-l)`` groups and ``F_l`` applies the
    merges' ``γ``/centring/reduction to the grouped vectors. Head outputs are read from each
    attention's out-projection input and put back in image coordinates with timm's own
    ``window_reverse`` and the inverse cyclic shift. The merge rule applies its map to grouped vectors
    (:meth:`PatchMergeRule.linear`) and gives its per-position offset (:meth:`PatchMergeRule.offset`):
    Swin V2's ``norm(reduction(·))`` is the same plan with another merge rule.
    """
    head = m.head
    gp = getattr(head, "global_pool", None)
    if getattr(gp, "pool_type", None) != "avg" or not isinstance(getattr(head, "flatten", nn.Identity()), nn.Identity):
        raise UnsupportedModuleError("head.global_pool: only mean pooling is a linear readout for Swin")
    if getattr(m.patch_embed, "output_fmt", None) is not None and str(m.patch_embed.output_fmt) not in ("Format.NHWC", "NHWC"):
        raise UnsupportedModuleError("patch_embed: Swin must produce NHWC tokens")
    final = _ln("norm", m.norm)
    blocks, units, stage_of = [], [], []
    merges: dict[int, tuple[str, nn.Module]] = {}
    specs: dict[int, NormSpec] = {}
    for s, stage in enumerate(m.layers):
        ds = stage.downsample
        if s > 0 and not isinstance(ds, nn.Identity):
            mr = rule_for("merge", f"layers.{s}.downsample", ds, "is not timm's PatchMerging")(f"layers.{s}.downsample", ds)
            merges[s] = (mr.path, mr)
            specs[s] = mr.spec
        elif s == 0 and not isinstance(ds, nn.Identity):
            raise UnsupportedModuleError("layers.0.downsample: a downsample before the first stage is not supported")
        for j, blk in enumerate(stage.blocks):
            path = f"layers.{s}.blocks.{j}"
            rule = rule_for("block", path, blk, "is not timm's SwinTransformerBlock")(path, blk)
            i = len(blocks)
            blocks.append((i, path, blk))
            stage_of.append(s)
            units += block_units(rule, i, s)
    L = len(m.layers) - 1

    def hooks(store):
        hs = [m.norm.register_forward_pre_hook(_store_input(store, "final_in"))]
        for s, (_, ds) in merges.items():
            hs.append(ds.norm.register_forward_pre_hook(_store_input(store, f"merge_in.{s}")))
            hs.append(ds.module.register_forward_pre_hook(_store_input(store, f"merge_src.{s}", lambda t: tuple(t.shape[1:3]))))
        return hs

    def finalize(store, convention, first) -> ReadoutMaps:
        xf = store["final_in"]
        dt = torch.float64 if xf.dtype == torch.float64 else torch.float32
        xf = _nhwc_seq(xf.to(dt))
        B, n, _ = xf.shape
        grid = {L: tuple(store["final_in"].shape[1:3])}
        mu, sig = layernorm_stats(xf, final)
        weights = {L: (1.0 / (n * sig[..., 0]))[:, None]}                          # [B, 1, N]
        offset = norm_offset(final, mu / sig, convention).mean(1)
        stats = {}
        for lvl in range(L, first, -1):
            if lvl in merges:
                xm = store[f"merge_in.{lvl}"].to(dt)                              # [B, h', w', 4C]
                mu_m, sig_m = layernorm_stats(_nhwc_seq(xm), specs[lvl])
                stats[lvl] = (mu_m, sig_m)
                grid[lvl - 1] = store[f"merge_src.{lvl}"]
                weights[lvl - 1] = _merge_weights(weights[lvl], 1.0 / sig_m[..., 0], grid[lvl - 1], grid[lvl])
            else:
                grid[lvl - 1] = grid[lvl]
                weights[lvl - 1] = weights[lvl]

        def lin(lvl: int, P: Tensor) -> Tensor:
            while lvl < L:
                nxt = lvl + 1
                if nxt in merges:
                    B_, K, G4, D = P.shape
                    P = merges[nxt][1].linear(P.reshape(B_, K, G4 // 4, 4 * D), convention)
                lvl = nxt
            return norm_linear(final, P[:, :, 0], convention)

        for lvl in range(first + 1, L + 1):                                      # merge offsets after embed
            if lvl in merges:
                mu_m, sig_m = stats[lvl]
                rule = merges[lvl][1]
                if hasattr(rule, "pooled_offset"):                                 # pooled before its matmul
                    o = rule.pooled_offset(weights[lvl], mu_m / sig_m, convention)
                else:
                    o = torch.einsum("bgn,bne->bge", weights[lvl], rule.offset(mu_m / sig_m, convention))
                offset = offset + lin(lvl, o[:, None])[:, 0]
        return ReadoutMaps(weights, lin, offset, store["z"].to(dt))

    def all_hooks(store):
        hs = hooks(store)
        hs.append(m.head.register_forward_hook(_store_output(store, "z")))
        return hs

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed", _nhwc_seq))]

    pe = m.patch_embed

    def grids(hw):
        g = {0: (hw[0] // pe.patch_size[0], hw[1] // pe.patch_size[1])}
        for s in range(1, L + 1):
            h, w = g[s - 1]
            g[s] = (-(-h // 2), -(-w // 2)) if s in merges else (h, w)
        return g

    def check(images: Tensor) -> None:
        if tuple(images.shape[-2:]) != tuple(pe.img_size) and getattr(pe, "strict_img_size", True):
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but this Swin expects {tuple(pe.img_size)} "
                             "(build it with img_size=... or call model.set_input_size)")

    return SpatialPlan(
        family=family, root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: stage_of[b], hooks=all_hooks, finalize=finalize,
        grids=grids)


# ---------------------------------------------------------------------------------------- MaxViT
def _pool_adjoint(pool: nn.Module, w_next: Tensor, hw: tuple[int, int]) -> Tensor:
    """Adjoint of a (linear, input-independent) spatial pooling: ``w_next [h', w']`` → ``[h, w]``."""
    with torch.inference_mode(False), torch.enable_grad():
        e = torch.zeros(1, 1, *hw, dtype=w_next.dtype, device=w_next.device, requires_grad=True)
        y = pool(e)
        (g,) = torch.autograd.grad(y, e, grad_outputs=w_next.clone().view_as(y))
    return g[0, 0].detach().clone()


def _avg_pool_only(path: str, pool: nn.Module) -> None:
    from timm.layers.pool2d_same import AvgPool2dSame

    if not isinstance(pool, (nn.AvgPool2d, AvgPool2dSame, nn.Identity)):
        raise UnsupportedModuleError(f"{path}: {type(pool).__qualname__} is not a linear (average) pooling; "
                                     "max-pooling shortcuts are not decomposed")


def _batchnorm_spec(path: str, bn: nn.Module) -> NormSpec:
    """An eval-mode ``nn.BatchNorm2d`` (running statistics) as the per-channel affine map it is:
    ``NormSpec("batchnorm", γ/√(var+eps), β − γ·mean/√(var+eps))`` (kind ``batchnorm``: never centred, no
    per-position statistics)."""
    if type(bn) is not nn.BatchNorm2d:
        raise UnsupportedModuleError(f"{path}: {type(bn).__qualname__} is not a plain BatchNorm2d (a fused "
                                     "activation is not affine)")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModuleError(f"{path}: BatchNorm2d without running statistics normalises with batch "
                                     "statistics even in eval mode; it is not decomposed")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
    return NormSpec("batchnorm", scale.detach(), shift.detach(), float(bn.eps))


def head_readout(m: nn.Module, fc: Optional[nn.Module]) -> Callable[[Tensor], Tensor]:
    """The readout of a timm model whose ``NormMlpClassifierHead`` may end in ``pre_logits.fc`` + tanh
    (MaxViT ``tf``, SAM with ``head_hidden_size``): ``forward_head(…, pre_logits=True)`` when ``fc`` is None
    (an affine head), else ``fc``'s output — the input of the tanh, the last affine point."""
    def readout(x: Tensor) -> Tensor:
        if fc is None:
            return m.forward_head(m.forward_features(x), pre_logits=True).flatten(1)
        out = {}
        h = fc.register_forward_hook(_store_output(out, "z", lambda t: t.flatten(1)))
        try:
            m.forward_head(m.forward_features(x), pre_logits=True)
        finally:
            h.remove()
        return out["z"]

    return readout


def maxvit_plan(m: nn.Module) -> SpatialPlan:
    """timm ``MaxxVit`` with MBConv + window + grid attention blocks (MaxViT).

    Components per block ``stages.s.blocks.j``: ``.conv`` (the whole MBConv branch: BatchNorm,
    depthwise conv and squeeze-excitation frozen inside it), ``.attn_block.attn`` heads,
    ``.attn_block.mlp``, ``.attn_grid.attn`` heads, ``.attn_grid.mlp``. A stride-2 block's shortcut
    (average pooling + 1×1 conv) is an affine map applied to every upstream component: its pooling
    becomes static position weights, its conv a channel matrix, its bias goes to ``bias``.

    Readout: the head's pooled, normed feature up to its last affine operation, i.e.
    ``z = W_pre · LN(mean_n x[n]) + b_pre`` — the input of ``head.pre_logits.act`` (tanh) when the head
    has a ``pre_logits`` layer, else the normed pooled vector (what the classifier consumes). The
    ``rw`` variants normalise every position before a plain mean-pool head instead (``norm``, frozen
    per-position σ, like Swin's final norm); ``coatnet_bn`` variants use an eval BatchNorm2d there (a
    per-channel affine map: nothing to freeze).

    The other MaxxVit blocks (CoAtNet's top-level ``MbConvBlock`` / ``TransformerBlock2d``, CoAtNeXt and
    MaxxViT's ``ConvNeXtBlock``, ``ParallelMaxxVitBlock``) are resolved through their registered rules
    (:mod:`.coatnet`); every block whose shortcut is a ``Downsample2d`` starts a new level.
    """
    from timm.layers import LayerNorm2d

    head = m.head
    if getattr(getattr(head, "global_pool", None), "pool_type", None) != "avg":
        raise UnsupportedModuleError("head.global_pool: only mean pooling is a linear readout for MaxViT")
    def spec2d(path: str, mod: nn.Module) -> NormSpec:
        if isinstance(mod, LayerNorm2d):          # LayerNorm over channels of an NCHW map
            return NormSpec("layernorm", mod.weight, mod.bias, float(mod.eps))
        return _ln(path, mod)

    if isinstance(m.norm, nn.Identity):
        final = None
    elif isinstance(m.norm, nn.BatchNorm2d):      # coatnet_bn: eval BatchNorm, a per-channel affine map
        final = _batchnorm_spec("norm", m.norm)
    else:
        final = spec2d("norm", m.norm)            # per-position (rw variants)
    hnorm = getattr(head, "norm", None)

    post = [PostOp("head.norm", spec=spec2d("head.norm", hnorm))] if hnorm is not None else []
    pre = getattr(head, "pre_logits", nn.Identity())
    fc = getattr(pre, "fc", None)
    if fc is not None:
        post.append(PostOp("head.pre_logits.fc", weight=_linear("head.pre_logits.fc", fc).weight, bias=fc.bias))
    elif not isinstance(pre, nn.Identity):
        raise UnsupportedModuleError(f"head.pre_logits: {type(pre).__qualname__} is not supported")

    blocks, units, level_in = [], [], []
    shortcuts: dict[int, tuple[str, "ShortcutMergeRule"]] = {}       # level reached → shortcut merge rule
    level = 0
    for s, stage in enumerate(m.stages):
        for j, blk in enumerate(stage.blocks):
            path = f"stages.{s}.blocks.{j}"
            rule = rule_for("block", path, blk, "is not a MaxxVit block (MaxxVitBlock, ParallelMaxxVitBlock, "
                            "MbConvBlock, ConvNeXtBlock, TransformerBlock2d)")(path, blk)
            i = len(blocks)
            blocks.append((i, path, blk))
            level_in.append(level)
            if rule.downsample is not None:
                level += 1
                shortcuts[level] = (rule.downsample.path, rule.downsample)
            units += block_units(rule, i, level)
    L = level

    readout = head_readout(m, fc)

    def hooks(store):
        hs = [head.global_pool.register_forward_hook(_store_output(store, "head_in", lambda t: t.flatten(1))),
              m.stages[-1].register_forward_hook(_store_output(store, "level_hw.last", lambda t: tuple(t.shape[2:])))]
        for lvl, (_, sc) in shortcuts.items():
            hs.append(sc.module.register_forward_pre_hook(_store_input(store, f"level_hw.{lvl - 1}", lambda t: tuple(t.shape[2:]))))
        if final is not None:
            hs.append(m.norm.register_forward_pre_hook(_store_input(store, "final_in", _nchw_seq)))
        return hs

    def finalize(store, convention, first) -> ReadoutMaps:
        total = store["head_in"]
        dt = torch.float64 if total.dtype == torch.float64 else torch.float32
        dev = total.device
        grid = {L: store["level_hw.last"]}
        for lvl in range(L, 0, -1):
            grid[lvl - 1] = store[f"level_hw.{lvl - 1}"] if lvl in shortcuts else grid[lvl]
        maps2d = {L: torch.full(grid[L], 1.0 / (grid[L][0] * grid[L][1]), dtype=dt, device=dev)}
        for lvl in range(L, first, -1):
            maps2d[lvl - 1] = _pool_adjoint(shortcuts[lvl][1].pool, maps2d[lvl], grid[lvl - 1]) \
                if lvl in shortcuts else maps2d[lvl]
        B = total.shape[0]
        weights = {lvl: w.reshape(1, 1, -1).expand(B, 1, -1) for lvl, w in maps2d.items()}
        offset = torch.zeros(B, total.shape[1], dtype=dt, device=dev)
        if final is not None and final.kind == "batchnorm":     # no statistics: static weights, β' to the offset
            offset = offset + final.bias.to(dt)
        elif final is not None:                       # per-position final norm: weights scale by 1/σ_n
            xf = store["final_in"].to(dt)
            mu, sig = layernorm_stats(xf, final)
            offset = offset + norm_offset(final, mu / sig, convention).mean(1)
            inv = 1.0 / sig[..., 0]                   # [B, N_L]
            # static weights stay per level; the final σ enters through the last level's weights
            # and, for earlier levels, through the adjoint of the poolings applied per image
            wl = {L: maps2d[L].reshape(1, -1) * inv}
            for lvl in range(L, first, -1):
                if lvl in shortcuts:
                    wl[lvl - 1] = torch.stack([_pool_adjoint(shortcuts[lvl][1].pool, wl[lvl][b].view(grid[lvl]),
                                                             grid[lvl - 1]).reshape(-1) for b in range(B)])
                else:
                    wl[lvl - 1] = wl[lvl]
            weights = {lvl: w[:, None] for lvl, w in wl.items()}

        def expand_w(lvl):
            ex = shortcuts[lvl][1].expand
            return None if isinstance(ex, nn.Identity) else ex.weight[:, :, 0, 0]

        def lin(lvl: int, P: Tensor) -> Tensor:
            for nxt in range(lvl + 1, L + 1):
                if nxt in shortcuts and expand_w(nxt) is not None:
                    P = P @ expand_w(nxt).to(P.dtype).T
            return P[:, :, 0] if final is None else norm_linear(final, P[:, :, 0], convention)

        for lvl in range(first + 1, L + 1):
            ex = shortcuts[lvl][1].expand if lvl in shortcuts else None
            if ex is not None and not isinstance(ex, nn.Identity) and ex.bias is not None:
                mass = weights[lvl].sum(-1)                                     # [B, 1]
                offset = offset + lin(lvl, (mass[..., None] * ex.bias.to(dt))[:, None])[:, 0]
        return ReadoutMaps(weights, lin, offset, total.to(dt), post=post)

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed", _nchw_seq))]

    stride0 = getattr(m.stem, "stride", 2)

    def grids(hw):
        return {lvl: (-(-hw[0] // (stride0 * 2 ** lvl)), -(-hw[1] // (stride0 * 2 ** lvl))) for lvl in range(L + 1)}

    def check(images: Tensor) -> None:
        if tuple(images.shape[-2:]) != tuple(m.img_size if isinstance(m.img_size, (tuple, list)) else (m.img_size,) * 2):
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but this MaxViT expects {m.img_size} "
                             "(window and grid partitions are sized for it; build it with img_size=...)")

    return SpatialPlan(
        family="timm-maxvit", root=m, blocks=blocks, units=units, readout=readout, check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: level_in[b], hooks=hooks, finalize=finalize, grids=grids)


# ------------------------------------------------------------------------------ block, branch, merge rules
@dataclass
class PatchMergeRule:
    """``merge`` rule of Swin's ``PatchMerging``: ``reduction(norm(concat of 2×2 neighbours))``."""

    path: str
    module: nn.Module
    norm: nn.Module
    spec: NormSpec
    reduction: nn.Linear

    def linear(self, P: Tensor, convention: str) -> Tensor:
        """The merge's linear part (its norm's ``1/σ`` already in the weights) on concatenated ``[..., 4C]``."""
        return norm_linear(self.spec, P, convention) @ self.reduction.weight.to(P.dtype).T

    def offset(self, mu_over_sigma: Tensor, convention: str) -> Tensor:
        """Per merged position constant ``[B, N', C']`` (``mu_over_sigma``: the norm's, ``[B, N', 1]``)."""
        o = norm_offset(self.spec, mu_over_sigma, convention) @ self.reduction.weight.to(mu_over_sigma.dtype).T
        return o if self.reduction.bias is None else o + self.reduction.bias.to(o.dtype)

    def pooled_offset(self, w: Tensor, mu_over_sigma: Tensor, convention: str) -> Tensor:
        """``Σ_n w[b, g, n] · offset[b, n]``, ``[B, G, C']`` for readout weights ``w [B, G, N']``: the norm's
        per-position offsets are pooled first and reduced once (the reduction is linear), instead of one
        reduction per merged position. A subclass with its own :meth:`offset` pools that one."""
        if type(self).offset is not PatchMergeRule.offset:
            return torch.einsum("bgn,bne->bge", w, self.offset(mu_over_sigma, convention))
        no = norm_offset(self.spec, mu_over_sigma, convention)                               # [B, N', 4C]
        o = torch.einsum("bgn,bne->bge", w, no) @ self.reduction.weight.to(no.dtype).T
        return o if self.reduction.bias is None else o + w.sum(-1, keepdim=True) * self.reduction.bias.to(o.dtype)


@dataclass
class ReduceNormMergeRule(PatchMergeRule):
    """``merge`` rule of Swin V2's ``PatchMerging``: ``norm(reduction(concat of 2×2 neighbours))``; the norm's
    per-position statistics (frozen) are those of the merged position."""

    def linear(self, P: Tensor, convention: str) -> Tensor:
        return norm_linear(self.spec, P @ self.reduction.weight.to(P.dtype).T, convention)

    def offset(self, mu_over_sigma: Tensor, convention: str) -> Tensor:
        return norm_offset(self.spec, mu_over_sigma, convention)      # reduction has no bias (checked at build)


@dataclass
class ShortcutMergeRule:
    """``merge`` rule of MaxViT's stride-2 shortcut ``Downsample2d``: average ``pool`` then 1×1 ``expand``."""

    path: str
    module: nn.Module
    pool: nn.Module
    expand: nn.Module


def swin_block(path: str, blk: nn.Module) -> BlockRule:
    """timm ``SwinTransformerBlock``: ``x + dp1(attn(windows(shift(n1(x)))))`` then ``x + dp2(mlp(n2(x)))``.

    The attention (any registered attention rule) sees windows of the cyclically shifted stream; its
    out-projection input is put back with timm's own ``window_reverse`` and the inverse shift."""
    from timm.models.swin_transformer import window_reverse

    attn_path = f"{path}.attn"
    a = rule_for("attention", attn_path, blk.attn)(attn_path, blk.attn)

    def reverse(t, shape):
        B, H, W, _ = shape
        ws, sh = blk.window_size, blk.shift_size
        Hp, Wp = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
        x = window_reverse(t.reshape(-1, ws[0], ws[1], t.shape[-1]), ws, Hp, Wp)[:, :H, :W]
        return _nhwc_seq(torch.roll(x, shifts=sh, dims=(1, 2)) if any(sh) else x)

    g1, g2 = _gain(path, ("drop_path1", blk.drop_path1)), _gain(path, ("drop_path2", blk.drop_path2))
    branches = [Branch("attn", attn_path, blk.attn, g1, attn=a, to_positions=reverse, shape_from=blk),
                Branch("mlp", f"{path}.mlp", blk.mlp, g2)]
    return BlockRule(path, attn_path, a, f"{path}.mlp", blk.mlp, g1, g2, branches=branches)


def partition_block(path: str, pa: nn.Module) -> BlockRule:
    """MaxViT ``PartitionAttentionCl`` (channels-last window or grid attention + MLP, LayerScale)."""
    from timm.models.maxxvit import grid_reverse, window_reverse

    attn_path = f"{path}.attn"
    a = rule_for("attention", attn_path, pa.attn)(attn_path, pa.attn)
    fn = window_reverse if pa.partition_block else grid_reverse

    def reverse(t, shape):
        return _nhwc_seq(fn(t, pa.partition_size, shape[1:3]))

    g1 = _gain(path, ("ls1", pa.ls1), ("drop_path1", pa.drop_path1))
    g2 = _gain(path, ("ls2", pa.ls2), ("drop_path2", pa.drop_path2))
    branches = [Branch("attn", attn_path, pa.attn, g1, attn=a, to_positions=reverse, shape_from=pa),
                Branch("mlp", f"{path}.mlp", pa.mlp, g2, to_positions=lambda t, _: _nhwc_seq(t))]
    return BlockRule(path, attn_path, a, f"{path}.mlp", pa.mlp, g1, g2, branches=branches)


def maxxvit_block(path: str, blk: nn.Module) -> BlockRule:
    """timm ``MaxxVitBlock``: an MBConv branch (``branch`` rule) then window and grid attention blocks
    (``block`` rules), channels-last."""
    if blk.nchw_attn:
        raise UnsupportedModuleError(f"{path}: MaxxVitBlock with NCHW attention is not decomposed (channels-last only)")
    conv = rule_for("branch", f"{path}.conv", blk.conv, "is not an MbConvBlock or ConvNeXtBlock")(f"{path}.conv",
                                                                                                  blk.conv)
    parts, first = [conv], None
    for part in ("attn_block", "attn_grid"):
        pa = getattr(blk, part)
        if pa is None:
            continue
        ppath = f"{path}.{part}"
        r = rule_for("block", ppath, pa, "is not a channels-last PartitionAttentionCl")(ppath, pa)
        first = first or r
        parts += r.parts()
    return BlockRule(path, first.attn_path, first.attn, first.mlp_path, first.mlp, first.gain1, first.gain2,
                     branches=parts, downsample=conv.merge)


def mbconv_branch(path: str, conv: nn.Module, name: Optional[str] = None) -> Branch:
    """timm ``MbConvBlock`` at ``path`` as one ``conv`` branch named ``name`` (default ``path``; BatchNorm,
    depthwise conv and SE frozen inside): its output is ``conv3_1x1``'s; a ``Downsample2d`` shortcut is its
    ``merge``."""
    sc = conv.shortcut
    merge = None if isinstance(sc, nn.Identity) else rule_for("merge", f"{path}.shortcut", sc)(f"{path}.shortcut", sc)
    return Branch("conv", name or path, conv.conv3_1x1, _gain(path, ("drop_path", conv.drop_path)),
                  to_positions=lambda t, _: _nchw_seq(t), merge=merge)


def _register() -> None:
    from timm.layers.attention_pool import AttentionPoolLatent
    from timm.models.maxxvit import Downsample2d, MaxxVit, MaxxVitBlock, MbConvBlock, PartitionAttentionCl
    from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock

    register_rule("model", SwinTransformer)(swin_plan)
    register_rule("model", MaxxVit)(maxvit_plan)
    register_rule("block", SwinTransformerBlock)(swin_block)
    register_rule("block", PartitionAttentionCl)(partition_block)
    register_rule("block", MaxxVitBlock)(maxxvit_block)
    register_rule("branch", MbConvBlock)(mbconv_branch)
    register_rule("pool", AttentionPoolLatent)(LatentPoolRule)

    @register_rule("merge", PatchMerging)
    def patch_merging(path: str, ds: nn.Module) -> PatchMergeRule:
        return PatchMergeRule(path, ds, ds.norm, _ln(f"{path}.norm", ds.norm), _linear(f"{path}.reduction", ds.reduction))

    @register_rule("merge", Downsample2d)
    def downsample2d(path: str, sc: nn.Module) -> ShortcutMergeRule:
        _avg_pool_only(f"{path}.pool", sc.pool)
        return ShortcutMergeRule(path, sc, sc.pool, sc.expand)


_register()
