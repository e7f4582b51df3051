"""ViT variants: DeiT distilled, BEiT / BEiT v2 / data2vec, CaiT, ``VisionTransformerRelPos``, post-norm
blocks (timm ``ResPostRelPosBlock``, ``ResPostBlock``, ``EvaBlockPostNorm``), differential attention, parallel blocks
(``ParallelScalingBlock``, ``DiffParallelScalingBlock``, ``ParallelThingsBlock``); SAM ViT refused.

Readouts: CLS / ``fc_norm`` after mean pooling go through :class:`~.models.ModelPlan`; readouts that weigh
positions by a per-token final norm's ``1/σ_n`` (DeiT distilled's two tokens, CaiT's class token,
BEiT / RelPos with a per-token norm before mean pooling) are per-position plans
(:class:`~.spatial.SpatialPlan`) built from the same registered block rules.

Every rule here reads the unmodified upstream modules with forward hooks (README “Supported models”).

Heads come from the out-projection's *input* (each head's attention-weighted values exactly as the
model's own kernel computed them, relative position biases, rotary embeddings and differential
attention included), pooled over the readout positions and projected by that head's slice of
``W_O`` (:class:`ProjInputAttention`). Only per-source-token terms recompute the readout rows of
attention, from the captured block input, with the family's own score terms (relative position
bias tables, shared relative position biases, q/k norms).

Post-norm blocks (``x + dp(LN(attn(x)))``) freeze the branch norm's per-position ``σ`` (docs/method.md):
with ``s = Σ_q w_q/σ_q`` the pooled branch is ``Σ_h γ⊙C(head_h)`` (each head pooled with weights
``w_q/σ_q``) ``+ γ⊙C(b_O)·s + β``. The ``b_O`` term varies with the image through ``s``, so it is split
evenly over the heads (and, for token terms, over the source tokens); ``β`` goes to ``bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .affine import NormSpec, layernorm_stats
from .attention import (AttentionRule, AttnResult, _no_mask, emit as emit_result, out_project, pooled_head_values,
                        readout_rows)
from .blocks import BlockRule, _gain, _make
from .models import ModelPlan, _blocks, _fixed_size_check, _norm, _patch_grid, _size_check
from .pool import Pooling
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan, Unit, norm_linear, norm_offset


# ------------------------------------------------------------------------ generic attention rule
class ProjInputAttention(AttentionRule):
    """Attention whose heads are read from its out-projection's input ``o [B, N, H·dh]``.

    ``head_h = (Σ_q w_q o_h(q)) · W_O,hᵀ``; ``bias`` = the out-projection bias. Subclasses implement
    :meth:`rows` (readout attention rows and values, for token terms) and may set ``self.post``
    (a norm module applied to the whole attention output, post-norm blocks: see module docstring).
    """

    proj_name = "proj"

    def __init__(self, path: str, module: nn.Module, num_heads: int, head_dim: int):
        super().__init__(path, module)
        proj = getattr(module, self.proj_name)
        if not isinstance(proj, nn.Linear):
            raise UnsupportedModuleError(f"{path}.{self.proj_name}: {type(proj).__qualname__} is not an nn.Linear")
        self.proj = proj
        self.num_heads, self.head_dim = num_heads, head_dim
        self.post: nn.Module | None = None
        self.post_spec: NormSpec | None = None

    def with_post_norm(self, path: str, norm: nn.Module) -> "ProjInputAttention":
        spec = rule_for("norm", path, norm)(norm)
        if spec.kind not in ("layernorm", "rmsnorm"):
            raise UnsupportedModuleError(f"{path}: post-norm of kind {spec.kind} is not supported")
        self.post, self.post_spec = norm, spec
        return self

    def out_proj(self) -> nn.Linear:
        """Per-position readouts read the heads at this Linear's input. A post-norm branch needs its norm's
        per-position σ there too: only the per-position plans of this module handle it (``_post_norm_unit``)."""
        if self.post is not None:
            raise UnsupportedModuleError(f"{self.path}: a post-norm attention branch inside this model's per-position "
                                         "readout (e.g. an attention pool) is not decomposed yet")
        return self.proj

    def position_hooks(self, ctx, sink):
        return [self.out_proj().register_forward_pre_hook(lambda _, args: sink(args[0]))]

    def position_unit(self, br, index: int, level: int) -> Unit:
        """The per-position unit of a post-norm branch ``br`` (a :class:`~.blocks.Branch`; used by
        :func:`~.families.block_units`): see :func:`_post_norm_unit`."""
        return _post_norm_unit(br.path, br.gain, self, index, level, br.to_positions, br.shape_from)

    # subclasses: readout rows α [B, H, N] for query weights w [B, S] at positions pos, values [B, H, N, dh]
    def rows(self, cap: dict, pos: slice, w: Tensor, dt) -> tuple[Tensor, Tensor]:
        raise UnsupportedModuleError(f"{self.path}: token terms are not available for {type(self.module).__qualname__}")

    def check_call(self, kwargs: dict) -> None:
        _no_mask(self.path, kwargs, "attn_mask", "is_causal")

    def hooks(self, ctx, sink):
        m, cap = self.module, {}

        def pre(_, args, kwargs):
            self.check_call(kwargs)
            cap.clear()
            cap["x"] = args[0] if args else kwargs["x"]
            cap["args"], cap["kw"] = args[1:], kwargs

        def on_proj(_, args):
            cap["o"] = args[0]

        def emit(out):
            emit_result(ctx, sink, cap, out, lambda res: self._split(ctx, cap, res, out.shape[1]))

        hs = [m.register_forward_pre_hook(pre, with_kwargs=True), self.proj.register_forward_pre_hook(on_proj)]
        if self.post is None:
            hs.append(m.register_forward_hook(lambda _, __, out: emit(out)))
        else:
            hs.append(m.register_forward_hook(lambda _, __, out: cap.__setitem__("y", out)))
            hs.append(self.post.register_forward_hook(lambda _, __, out: emit(out)))
        return hs

    def _split(self, ctx, cap, res: AttnResult, n: int) -> None:
        H, dh, dt = self.num_heads, self.head_dim, ctx.dtype
        pos = ctx.pooling.positions(n)
        o = cap["o"][:, pos].to(dt)                                              # [B, S, H·dh]
        B, dev = o.shape[0], o.device
        w = ctx.pooling.weights(n, B, dt, dev)                                   # [B, S]
        w_o = self.proj.weight.to(dt).view(-1, H, dh)                            # [D, H, dh]
        b_o = self.proj.bias.to(dt) if self.proj.bias is not None else torch.zeros(w_o.shape[0], dtype=dt, device=dev)
        spec = self.post_spec
        if spec is not None:
            _, sigma = layernorm_stats(cap["y"][:, pos].to(dt), spec)           # [B, S, 1]
            w = w / sigma[..., 0]
        heads = out_project(pooled_head_values(o, w, H, dh), w_o)[:, :, 0]      # [B, H, D]
        share = None
        if spec is None:
            res.bias = b_o
        else:
            heads = self._post_linear(heads)
            share = self._post_linear(b_o * w.sum(-1, keepdim=True)) / H        # [B, D], b_O split over heads
            heads = heads + share[:, None]
            res.bias = spec.bias.to(dt) if spec.bias is not None else torch.zeros_like(b_o)
        res.heads = heads
        wanted = ctx.token_heads(self.path)
        if wanted:
            alpha, v = self.rows(cap, pos, w, dt)                                # [B, H, N], [B, H, N, dh]
            for h in wanted:
                t = out_project((alpha[:, h, :, None] * v[:, h])[:, None], w_o[:, h:h + 1])[:, 0]   # [B, N, D]
                if spec is not None:
                    t = self._post_linear(t) + share[:, None] / t.shape[1]
                res.tokens[h] = t

    def _post_linear(self, s: Tensor) -> Tensor:
        """Linear part of the frozen post-norm (its 1/σ already in the weights): ``γ ⊙ C(s)``."""
        spec = self.post_spec
        if spec.kind == "layernorm":
            s = s - s.mean(-1, keepdim=True)
        return s * spec.weight.to(s.dtype) if spec.weight is not None else s


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    return torch.einsum("bhsd,bhnd->bhsn", q, k) * scale


def _lin(x: Tensor, lin: nn.Linear, dt, bias=None) -> Tensor:
    b = bias if bias is not None else (lin.bias.to(dt) if lin.bias is not None else None)
    return F.linear(x, lin.weight.to(dt), b)


def _fused_qkv(m: nn.Module, x: Tensor, H: int, dh: int, dt) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, H, N, dh]`` of a fused-``qkv`` attention (timm ``Attention`` layout) on its input ``x``,
    with the module's own q/k norms applied."""
    x = x.to(dt)
    B, N, _ = x.shape
    q, k, v = _lin(x, m.qkv, dt).reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
    return m.q_norm(q), m.k_norm(k), v


# --------------------------------------------------------------------------------------- BEiT
def _register_beit() -> None:
    from timm.models import beit

    @register_rule("attention", beit.Attention)
    class BeitAttentionRule(ProjInputAttention):
        """BEiT ``Attention``: a relative position bias (own table and/or the model's shared one) is
        added to the attention scores; it only changes the probabilities."""

        def __init__(self, path: str, module: nn.Module):
            H = module.num_heads
            super().__init__(path, module, H, module.proj.in_features // H)

        def rows(self, cap, pos, w, dt):
            m, H = self.module, self.num_heads
            x = cap["x"].to(dt)
            B, N, _ = x.shape
            bias = None if m.q_bias is None else torch.cat((m.q_bias, m.k_bias, m.v_bias)).to(dt)
            q, k, v = _lin(x, m.qkv, dt, bias).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            scores = _scores(q[:, :, pos], k, m.scale)
            if m.relative_position_bias_table is not None:
                scores = scores + m._get_rel_pos_bias().to(dt)[:, :, pos]
            shared = cap["kw"].get("shared_rel_pos_bias", cap["args"][0] if cap["args"] else None)
            if shared is not None:
                scores = scores + shared.to(dt).reshape(-1, *shared.shape[-3:])[:, :, pos]
            return readout_rows(scores, w), v

    @register_rule("block", beit.Block)
    def beit_block(path: str, module: nn.Module) -> BlockRule:
        """``x + dp1(γ1 ⊙ attn(n1(x)))``, ``x + dp2(γ2 ⊙ mlp(n2(x)))`` (γ: BEiT's LayerScale, optional)."""
        return _make(path, module, "attn", "mlp", ("drop_path1",), ("drop_path2",), module.gamma_1, module.gamma_2)

    @register_rule("model", beit.Beit)
    def beit_model(m: nn.Module) -> ModelPlan:
        """BEiT / BEiT v2 / data2vec-vision: CLS or mean-pooled readout as for timm ViT."""
        return _token_or_avg_plan(m, "timm-beit", "BEiT")


def _token_or_avg_plan(m: nn.Module, family: str, what: str):
    npt = m.num_prefix_tokens
    if m.global_pool == "token":
        if npt < 1 or getattr(m, "cls_token", None) is None:
            raise UnsupportedModuleError(f"{what} with global_pool='token' but no class token")
        pooling = Pooling("token", index=0)
    elif m.global_pool == "avg":
        if not isinstance(m.norm, nn.Identity):
            return _per_token_norm_avg_plan(m, family, what)
        pooling = Pooling("avg", start=npt)
    else:
        raise UnsupportedModuleError(f"{what} global_pool={m.global_pool!r}: only 'token' and 'avg' are linear readouts")
    rule_for("scale", "head_drop", m.head_drop)
    pe = m.patch_embed
    check = _size_check(m, f"this timm {what}")
    return ModelPlan(
        family=family, root=m, blocks=_blocks("blocks", m.blocks), pooling=pooling,
        post=[_norm("norm", m.norm), _norm("fc_norm", m.fc_norm)], layout="BND", num_prefix_tokens=npt,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True), grid=_patch_grid(pe),
        check_input=check)


def _per_token_norm_avg_plan(m: nn.Module, family: str, what: str) -> SpatialPlan:
    """``z = fc_norm(mean_{n ≥ npt} norm(x_L[n]))``: a per-token final norm before mean pooling weighs
    every patch by its own frozen ``1/σ_n`` (a per-position readout; token terms are positions)."""
    final = rule_for("norm", "norm", m.norm)(m.norm)
    if final.kind not in ("layernorm", "rmsnorm"):
        raise UnsupportedModuleError(f"norm: final norm of kind {final.kind} is not supported for {what}")
    rule_for("scale", "head_drop", m.head_drop)
    blocks, units = _rule_units("blocks", m.blocks)
    npt, pe = m.num_prefix_tokens, m.patch_embed
    check = _size_check(m, f"this timm {what}")

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(lambda _, args: store.__setitem__("embed", args[0]))]

    return _final_position_plan(m, f"{family}-gap", blocks, units, final, m.norm, lambda n: list(range(npt, n)), npt,
                                lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check,
                                _patch_grid(pe), embed_hook, post=[_norm("fc_norm", m.fc_norm)])


# ------------------------------------------------------------------------ VisionTransformerRelPos
def _register_relpos() -> None:
    from timm.models import vision_transformer_relpos as vr

    @register_rule("attention", vr.RelPosAttention)
    class RelPosAttentionRule(ProjInputAttention):
        """``RelPosAttention``: q/k norms, a relative position bias (``rel_pos.get_bias()``: table, MLP or
        log-coordinate MLP) or the model's shared one, added to the scores exactly as the module's
        fused / unfused branch does."""

        def __init__(self, path: str, module: nn.Module):
            super().__init__(path, module, module.num_heads, module.head_dim)

        def rows(self, cap, pos, w, dt):
            m, H, dh = self.module, self.num_heads, self.head_dim
            q, k, v = _fused_qkv(m, cap["x"], H, dh, dt)
            scores = _scores(q[:, :, pos], k, m.scale)
            shared = cap["kw"].get("shared_rel_pos", cap["args"][0] if cap["args"] else None)
            if m.rel_pos is not None:
                bias = m.rel_pos.get_bias()          # both branches of the module use only its own bias
            else:
                bias = shared
            if bias is not None:
                scores = scores + bias.to(dt).reshape(-1, *bias.shape[-3:])[:, :, pos]
            return readout_rows(scores, w), v

    @register_rule("block", vr.RelPosBlock)
    def relpos_block(path: str, module: nn.Module) -> BlockRule:
        return _make(path, module, "attn", "mlp", ("ls1", "drop_path1"), ("ls2", "drop_path2"))

    @register_rule("block", vr.ResPostRelPosBlock)
    def respost_relpos_block(path: str, module: nn.Module) -> BlockRule:
        """Post-norm ``x + dp1(n1(attn(x)))``, ``x + dp2(n2(mlp(x)))``: see the module docstring."""
        return _post_norm_block(path, module)

    @register_rule("model", vr.VisionTransformerRelPos)
    def relpos_model(m: nn.Module) -> ModelPlan:
        return _token_or_avg_plan(m, "timm-vit-relpos", "VisionTransformerRelPos")


def _post_norm_block(path: str, module: nn.Module) -> BlockRule:
    """A post-norm block: the attention rule carries ``norm1`` (frozen per-position σ); the MLP
    component is ``norm2``'s output (the whole branch, its β included), named ``<path>.mlp``."""
    attn_path = f"{path}.attn"
    rule = rule_for("attention", attn_path, module.attn)(attn_path, module.attn)
    if not isinstance(rule, ProjInputAttention):
        raise UnsupportedModuleError(f"{attn_path}: {type(module.attn).__qualname__} in a post-norm block is not "
                                     "supported (its rule does not read the out-projection input)")
    rule.with_post_norm(f"{path}.norm1", module.norm1)
    rule_for("norm", f"{path}.norm2", module.norm2)
    g1 = _gain(path, ("drop_path1", module.drop_path1))
    g2 = _gain(path, ("drop_path2", module.drop_path2))
    return BlockRule(path, attn_path, rule, f"{path}.mlp", module.norm2, g1, g2)


# -------------------------------------------------------------------------------- EVA post-norm
def _register_eva_post_norm() -> None:
    from timm.models.eva import EvaBlockPostNorm

    class EvaPostNormAttention(ProjInputAttention):
        """``EvaAttention`` inside a post-norm block (rotary embeddings; no sub-norm)."""

        def __init__(self, path: str, module: nn.Module):
            inner = rule_for("attention", path, module)(path, module)      # the registry decides (MRO)
            if not hasattr(inner, "_qkv"):
                raise UnsupportedModuleError(f"{path}: {type(module).__qualname__} inside a post-norm EVA block needs "
                                             "an attention rule that recomputes queries and keys (timm's "
                                             "EvaAttention rule does)")
            super().__init__(path, module, module.num_heads, module.head_dim)
            if not isinstance(module.norm, nn.Identity):
                raise UnsupportedModuleError(f"{path}.norm: an attention sub-norm inside a post-norm EVA block is "
                                             "not supported yet")
            self.inner = inner

        def rows(self, cap, pos, w, dt):
            rope = cap["kw"].get("rope", cap["args"][0] if cap["args"] else None)
            q, k, v = self.inner._qkv(cap["x"].to(dt), rope, dt)
            return readout_rows(_scores(q[:, :, pos], k, self.module.scale), w), v

    @register_rule("block", EvaBlockPostNorm)
    def eva_post_norm_block(path: str, module: nn.Module) -> BlockRule:
        """EVA post-norm block: ``x + dp1(n1(attn(x)))``, ``x + dp2(n2(mlp(x)))``."""
        attn_path = f"{path}.attn"
        rule = EvaPostNormAttention(attn_path, module.attn).with_post_norm(f"{path}.norm1", module.norm1)
        rule_for("norm", f"{path}.norm2", module.norm2)
        return BlockRule(path, attn_path, rule, f"{path}.mlp", module.norm2,
                         _gain(path, ("drop_path1", module.drop_path1)), _gain(path, ("drop_path2", module.drop_path2)))


# ------------------------------------------------------------------------------- ViT ResPostBlock
class TimmPostNormAttention(ProjInputAttention):
    """timm ``Attention`` inside a post-norm ``ResPostBlock`` (fused qkv Linear, optional q/k norms):
    heads from the out-projection input; token terms recompute the readout rows from the captured
    block input. A sub-norm (``scale_attn_norm``) or an output gate is refused."""

    def __init__(self, path: str, module: nn.Module):
        for name in ("qkv", "proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise UnsupportedModuleError(f"{path}.{name}: {type(getattr(module, name, None)).__qualname__} is not "
                                             "an nn.Linear")
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModuleError(f"{path}.norm: an attention sub-norm (scale_attn_norm=True) inside a "
                                         "post-norm ResPostBlock is not supported yet; build without it")
        if getattr(module, "gate", None) is not None:
            raise UnsupportedModuleError(f"{path}.gate: gated attention inside a ResPostBlock is not supported yet")
        super().__init__(path, module, module.num_heads, module.head_dim)

    def rows(self, cap, pos, w, dt):
        m, H, dh = self.module, self.num_heads, self.head_dim
        q, k, v = _fused_qkv(m, cap["x"], H, dh, dt)
        return readout_rows(_scores(q[:, :, pos], k, m.scale), w), v


def _register_respost() -> None:
    from timm.models.vision_transformer import ResPostBlock

    from .attention import TimmAttention

    @register_rule("block", ResPostBlock)
    def respost_block(path: str, module: nn.Module) -> BlockRule:
        """timm ``ResPostBlock`` (``vit_base_patch16_rpn_224``): post-norm ``x + dp1(n1(attn(x)))``,
        ``x + dp2(n2(mlp(x)))``, the same post-norm units as ``ResPostRelPosBlock`` (module docstring).
        The attention's registered rule decides: timm ``Attention`` is read by
        :class:`TimmPostNormAttention`; a rule that reads the out-projection input already is used as is."""
        attn_path = f"{path}.attn"
        inner = rule_for("attention", attn_path, module.attn)(attn_path, module.attn)
        if isinstance(inner, ProjInputAttention):
            return _post_norm_block(path, module)
        if not isinstance(inner, TimmAttention):
            raise UnsupportedModuleError(f"{attn_path}: {type(module.attn).__qualname__} inside a post-norm ResPostBlock "
                                         "is not supported (its rule does not read the out-projection input)")
        rule = TimmPostNormAttention(attn_path, module.attn).with_post_norm(f"{path}.norm1", module.norm1)
        rule_for("norm", f"{path}.norm2", module.norm2)
        return BlockRule(path, attn_path, rule, f"{path}.mlp", module.norm2,
                         _gain(path, ("drop_path1", module.drop_path1)), _gain(path, ("drop_path2", module.drop_path2)))


# ----------------------------------------------------------------------------- differential attention
def _register_diff() -> None:
    from timm.layers.diff_attention import DiffAttention

    @register_rule("attention", DiffAttention)
    class DiffAttentionRule(ProjInputAttention):
        """timm ``DiffAttention``: per head, ``(softmax(q1k1) − λ softmax(q2k2)) v``, then a per-head
        RMSNorm over the head's ``2·dh`` channels and the factor ``1 − λ_init``. Heads are read from the
        out-projection input (head width ``2·dh``); token terms freeze the per-head RMS ``σ`` of each query
        position and use the differential rows. A sub-norm over all heads (``scale_norm``) is refused."""

        def __init__(self, path: str, module: nn.Module):
            if not isinstance(module.norm, nn.Identity):
                raise UnsupportedModuleError(f"{path}.norm: DiffAttention with scale_norm=True is not supported yet")
            super().__init__(path, module, module.num_heads, 2 * module.head_dim)

        def rows(self, cap, pos, w, dt):
            q, k, v = _lin(cap["x"].to(dt), self.module.qkv, dt).chunk(3, dim=2)
            return _diff_rows(self.module, self.path, q, k, v, pos, w, dt)


# ----------------------------------------------------------------------------------- parallel blocks
class _BranchOutput:
    """Stands in for a branch module whose output is not a module output: ``register_forward_hook(fn)``
    calls ``fn(None, None, out)`` with the branch output computed by ``compute`` from a hook on ``module``
    (``pre=True``: its input, else its output). The engine only registers forward hooks on a block's MLP."""

    def __init__(self, module: nn.Module, compute, pre: bool):
        self.module, self.compute, self.pre = module, compute, pre

    def register_forward_hook(self, fn):
        if self.pre:
            return self.module.register_forward_pre_hook(lambda _, args: fn(None, None, self.compute(args[0])))
        return self.module.register_forward_hook(lambda _, __, out: fn(None, None, self.compute(out)))


class _SumOfBranches:
    """The sum of several parallel branch modules' outputs, reported once the last one has run (stands in
    for a block's MLP module: the engine only registers forward hooks on it)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def register_forward_hook(self, fn):
        parts: list = []

        def hook(_, __, out):
            parts.append(out)
            if len(parts) == len(self.modules):
                total = torch.stack(parts).sum(0)
                parts.clear()
                fn(None, None, total)

        return _Handles([m.register_forward_hook(hook) for m in self.modules])


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


class ParallelScalingAttention(AttentionRule):
    """The attention half of timm ``ParallelScalingBlock`` (ViT-22B style: one fused in-projection for
    qkv and the MLP's first layer, attention and MLP in parallel, one LayerScale on their sum).

    The block has no attention submodule: the component is named ``<block>.attn`` and its heads
    ``<block>.attn.head.<h>``; heads are read from the out-projection's attention slice (``x_attn``)
    and projected by ``W_out[:, :D]`` (fused) or ``attn_out_proj``. With a fused out-projection its
    single bias goes to the attention's ``bias`` share (the MLP component is ``W_out[:, D:] x_mlp``)."""

    def __init__(self, path: str, block: nn.Module):
        super().__init__(path, block)
        self.num_heads, self.head_dim = block.num_heads, block.head_dim
        self.dim = block.in_split[-1]                      # model width: the attention slice of the out-projection
        fused = block.out_proj is not None
        self.proj = block.out_proj if fused else block.attn_out_proj
        for name in ("in_proj", "out_proj" if fused else "attn_out_proj"):
            if not isinstance(getattr(block, name), nn.Linear):
                raise UnsupportedModuleError(f"{path.rsplit('.', 1)[0]}.{name}: not an nn.Linear")

    def out_proj(self) -> nn.Linear:
        raise UnsupportedModuleError(f"{self.path}: ParallelScalingBlock inside a per-position readout (attention pool, "
                                     "per-token norm + mean pooling) is not decomposed yet; use a CLS or fc_norm readout")

    def _w_attn(self, dt) -> Tensor:
        return self.proj.weight.to(dt)[:, :self.dim]

    def hooks(self, ctx, sink):
        m, cap, D = self.module, {}, self.dim

        def pre(_, args, kwargs):
            _no_mask(self.path, kwargs, "attn_mask", "is_causal")
            cap.clear()
            cap["x"] = args[0] if args else kwargs["x"]

        def on_proj(_, args):
            o = args[0][..., :D]
            with ctx.exact():
                dt = ctx.dtype
                b = self.proj.bias.to(dt) if self.proj.bias is not None else None
                branch = ctx.pooling.pool(o.to(dt)) @ self._w_attn(dt).T
                res = AttnResult(branch=branch if b is None else branch + b)
                if ctx.heads:
                    self._split(ctx, cap, o, res)
            cap.clear()
            sink(res)

        return [m.register_forward_pre_hook(pre, with_kwargs=True), self.proj.register_forward_pre_hook(on_proj)]

    def _split(self, ctx, cap, o: Tensor, res: AttnResult) -> None:
        m, H, dh, dt = self.module, self.num_heads, self.head_dim, ctx.dtype
        n = o.shape[1]
        pos = ctx.pooling.positions(n)
        B = o.shape[0]
        w = ctx.pooling.weights(n, B, dt, o.device)
        w_o = self._w_attn(dt).reshape(-1, H, dh)
        res.heads = out_project(pooled_head_values(o[:, pos].to(dt), w, H, dh), w_o)[:, :, 0]
        res.bias = self.proj.bias.to(dt) if self.proj.bias is not None else torch.zeros(w_o.shape[0], dtype=dt,
                                                                                         device=o.device)
        wanted = ctx.token_heads(self.path)
        if wanted:
            x = cap["x"].to(dt)
            _, q, k, v = torch.split(_lin(m.in_norm(x), m.in_proj, dt), m.in_split, dim=-1)
            alpha, v = self.rows(q, k, v, pos, w, dt)
            for h in wanted:
                res.tokens[h] = out_project((alpha[:, h, :, None] * v[:, h])[:, None], w_o[:, h:h + 1])[:, 0]

    def rows(self, q, k, v, pos, w, dt) -> tuple[Tensor, Tensor]:
        """Readout rows ``[B, H, N]`` and values ``[B, H, N, dh]`` from the in-projection's q, k, v slices."""
        m, H, dh = self.module, self.num_heads, self.head_dim
        B, N, _ = q.shape
        q = m.q_norm(q.reshape(B, N, H, dh)).transpose(1, 2)
        k = m.k_norm(k.reshape(B, N, H, dh)).transpose(1, 2)
        v = v.reshape(B, N, H, dh).transpose(1, 2)
        return readout_rows(_scores(q[:, :, pos], k, m.scale), w), v


class DiffParallelScalingAttention(ParallelScalingAttention):
    """The attention half of timm ``DiffParallelScalingBlock``: differential attention (see
    :class:`DiffAttentionRule`) inside a parallel scaling block; heads are ``2·dh`` wide."""

    def __init__(self, path: str, block: nn.Module):
        super().__init__(path, block)
        self.head_dim = 2 * block.head_dim

    def rows(self, q, k, v, pos, w, dt):
        return _diff_rows(self.module, self.path, q, k, v, pos, w, dt)


def _diff_rows(m: nn.Module, path: str, q: Tensor, k: Tensor, v: Tensor, pos: slice, w: Tensor, dt):
    """Differential attention readout rows (per-head RMS σ of each query folded in) and values scaled
    by the sub-norm's γ and ``1 − λ_init``, from q, k, v ``[B, N, ·]`` as the in-projection gives them."""
    H, dh = m.num_heads, m.head_dim
    B, N, _ = q.shape
    q = m.q_norm(q.reshape(B, N, 2 * H, dh).transpose(1, 2))
    k = m.k_norm(k.reshape(B, N, 2 * H, dh).transpose(1, 2))
    v = v.reshape(B, N, H, 2 * dh).transpose(1, 2)                                   # [B, H, N, 2dh]
    lam = m._compute_lambda().to(dt)
    p = _scores(q[:, :, pos], k, m.scale).softmax(-1).view(B, H, 2, -1, N)          # [B, H, 2, S, N]
    a = p[:, :, 0] - lam * p[:, :, 1]                                                 # [B, H, S, N]
    mixed = torch.einsum("bhsn,bhnd->bhsd", a, v)                                     # pre-sub-norm outputs
    spec = rule_for("norm", f"{path}.sub_norm", m.sub_norm)(m.sub_norm)
    _, sigma = layernorm_stats(mixed, spec)                                           # [B, H, S, 1]
    alpha = torch.einsum("bs,bhsn->bhn", w, a / sigma)                               # rows with 1/σ folded
    g = spec.weight.to(dt) if spec.weight is not None else 1.0
    return alpha, v * g * (1 - m.lambda_init)


def _register_parallel() -> None:
    from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock

    @register_rule("block", ParallelScalingBlock, DiffParallelScalingBlock)
    def parallel_scaling_block(path: str, module: nn.Module) -> BlockRule:
        """``x + dp(ls(out_proj([attn(y), act(fc1(y))])))``, ``y = in_norm(x)``: attention component
        ``<path>.attn`` (heads), MLP component ``<path>.mlp``; both carry the block's LayerScale."""
        rule_for("norm", f"{path}.in_norm", module.in_norm)
        cls = DiffParallelScalingAttention if isinstance(module, DiffParallelScalingBlock) else ParallelScalingAttention
        attn = cls(f"{path}.attn", module)
        D = attn.dim
        if module.out_proj is not None:
            w_mlp = module.out_proj.weight[:, D:]
            mlp = _BranchOutput(module.out_proj, lambda t: F.linear(t[..., D:], w_mlp.to(t.dtype)), pre=True)
        else:
            mlp = _BranchOutput(module.mlp_out_proj, lambda t: t, pre=False)
        g = _gain(path, ("ls", module.ls), ("drop_path", module.drop_path))
        return BlockRule(path, f"{path}.attn", attn, f"{path}.mlp", mlp, g, g)

    @register_rule("block", ParallelThingsBlock)
    def parallel_things_block(path: str, module: nn.Module) -> BlockRule:
        """``x + Σ_i attns[i](x)`` then ``x + Σ_i ffns[i](x)`` (each a pre-norm branch with its own LayerScale).
        Components: ``<path>.attns`` (heads ``<path>.attns.head.<k>``, ``k = i·H + h`` for head ``h`` of
        ``attns.<i>.attn``) and ``<path>.ffns`` (the sum of the parallel MLP branches)."""
        attn = ParallelAttentions(f"{path}.attns", module)
        for i, ff in enumerate(module.ffns):
            _gain(f"{path}.ffns.{i}", ("ls", ff.ls), ("drop_path", ff.drop_path))
            rule_for("norm", f"{path}.ffns.{i}.norm", ff.norm)
        return BlockRule(path, f"{path}.attns", attn, f"{path}.ffns", _SumOfBranches(list(module.ffns)), None, None)


class _SubContext:
    """A rule context seen by one of several parallel attention layers: its own token heads."""

    def __init__(self, ctx, heads: list[int]):
        self._ctx, self._heads = ctx, heads

    def token_heads(self, path: str) -> list[int]:
        return self._heads

    def __getattr__(self, name):
        return getattr(self._ctx, name)


class ParallelAttentions(AttentionRule):
    """timm ``ParallelThingsBlock``'s parallel attention branches ``attns.<i>`` (norm → attention → LayerScale),
    decomposed by their own registered attention rules and reported as one attention layer whose heads
    are the branches' heads in order (each carrying its branch's LayerScale)."""

    def __init__(self, path: str, block: nn.Module):
        super().__init__(path, block)
        self.parts = []
        for i, br in enumerate(block.attns):
            p = f"{path}.{i}"
            rule_for("norm", f"{p}.norm", br.norm)
            rule = rule_for("attention", f"{p}.attn", br.attn)(f"{p}.attn", br.attn)
            self.parts.append((rule, _gain(p, ("ls", br.ls), ("drop_path", br.drop_path))))
        dims = {r.head_dim for r, _ in self.parts}
        if len(dims) != 1:
            raise UnsupportedModuleError(f"{path}: parallel attentions with different head sizes {sorted(dims)}")
        self.head_dim = dims.pop()
        self.num_heads = sum(r.num_heads for r, _ in self.parts)

    def out_proj(self) -> nn.Linear:
        raise UnsupportedModuleError(f"{self.path}: ParallelThingsBlock inside a per-position readout (attention pool, "
                                     "per-token norm + mean pooling) is not decomposed yet; use a CLS or fc_norm readout")

    def hooks(self, ctx, sink):
        results: dict[int, AttnResult] = {}
        wanted = ctx.token_heads(self.path)
        handles, offset = [], 0

        def collect(i: int, r: AttnResult) -> None:
            results[i] = r
            if len(results) == len(self.parts):
                sink(self._combine(ctx, results))
                results.clear()

        for i, (rule, _) in enumerate(self.parts):
            mine = [h - offset for h in wanted if offset <= h < offset + rule.num_heads]
            handles += rule.hooks(_SubContext(ctx, mine), lambda r, i=i: collect(i, r))
            offset += rule.num_heads
        return handles

    def _combine(self, ctx, results: dict) -> AttnResult:
        with ctx.exact():
            gains = [g.to(ctx.dtype) if g is not None else 1.0 for _, g in self.parts]
            out = AttnResult(branch=sum(results[i].branch * g for i, g in enumerate(gains)))
            if ctx.heads:
                out.heads = torch.cat([results[i].heads * g for i, g in enumerate(gains)], 1)
                out.bias = sum(results[i].bias * g for i, g in enumerate(gains))
                offset = 0
                for i, (rule, _) in enumerate(self.parts):
                    out.tokens.update({offset + h: t * gains[i] for h, t in results[i].tokens.items()})
                    offset += rule.num_heads
        return out


# ------------------------------------------------------------------------------------ DeiT distilled
def _rule_units(prefix: str, seq: nn.Module) -> tuple[list, list[Unit]]:
    """Per-position units of blocks resolved through their registered block rules, for attention rules
    whose out-projection input is the concatenation of the heads (no post-norm, no sub-norm)."""
    blocks, units = [], []
    for i, blk in enumerate(seq):
        path = f"{prefix}.{i}"
        rule = rule_for("block", path, blk)(path, blk)
        a = rule.attn
        proj = a.proj if isinstance(a, ProjInputAttention) else getattr(a.module, "proj", None)
        ok = (isinstance(proj, nn.Linear) and isinstance(rule.mlp, nn.Module)
              and (isinstance(a, ProjInputAttention)
                   or isinstance(getattr(a.module, "norm", nn.Identity()), nn.Identity)))
        if not ok:
            raise UnsupportedModuleError(f"{path}: {type(blk).__qualname__} with {type(a.module).__qualname__} is not "
                                         "decomposed with a per-position readout (per-token final norm before pooling)")
        blocks.append((i, path, blk))
        if isinstance(a, ProjInputAttention) and a.post is not None:
            units.append(_post_norm_unit(rule.attn_path, rule.gain1, a, i))
            units.append(Unit("branch", rule.mlp_path, "mlp", i, 0, _output_hooks(rule.mlp), rule.gain2))
            continue

        def attn_hooks(store, key, *_ctx, proj=proj):
            return [proj.register_forward_pre_hook(lambda _, args: store.__setitem__(key, args[0]))]

        def mlp_hooks(store, key, *_ctx, mlp=rule.mlp):
            return [mlp.register_forward_hook(lambda _, __, out: store.__setitem__(key, out))]

        units.append(Unit("attn", rule.attn_path, "attn", i, 0, attn_hooks, rule.gain1, a.num_heads, a.head_dim, proj))
        units.append(Unit("branch", rule.mlp_path, "mlp", i, 0, mlp_hooks, rule.gain2))
    return blocks, units


def _output_hooks(module: nn.Module):
    def hooks(store, key, *_ctx):
        return [module.register_forward_hook(lambda _, __, out: store.__setitem__(key, out))]
    return hooks


class _FrozenProj:
    """A Linear-like ``weight``/``bias`` pair for a per-position unit (read by the engine, never called)."""

    def __init__(self, weight: Tensor, bias):
        self.weight, self.bias = weight, bias


def _post_norm_unit(name: str, gain, a: ProjInputAttention, index: int, level: int = 0, to_positions=None,
                    shape_from: nn.Module | None = None) -> Unit:
    """A post-norm attention branch ``LN(Σ_h o_h W_O,hᵀ + b_O)`` per position as a unit with heads of width
    ``dh + 1``: the stored input is ``[o_h/σ_q, 1/(H σ_q)]`` per head (σ_q of the attention output, frozen)
    and the frozen projection ``[γ⊙C(W_O,h), γ⊙C(b_O)]``, so each head carries its ``b_O/H`` share and the
    norm's β is the unit's constant bias (same split as :class:`ProjInputAttention`).

    ``to_positions(o, shape)`` / ``shape_from``: as in :class:`~.blocks.Branch`, when the out-projection sees
    partitioned positions (Swin V2 windows) and the norm the stream in image coordinates."""
    spec, H, dh = a.post_spec, a.num_heads, a.head_dim
    w_o = a.proj.weight.detach()
    b_o = a.proj.bias.detach() if a.proj.bias is not None else torch.zeros_like(w_o[:, 0])

    def lin(t: Tensor) -> Tensor:                 # γ ⊙ C(·) along the output dimension (dim 0)
        if spec.kind == "layernorm":
            t = t - t.mean(0, keepdim=True)
        return t * spec.weight.detach()[:, None] if spec.weight is not None else t

    w = torch.cat([lin(w_o).view(-1, H, dh), lin(b_o[:, None]).expand(-1, H)[..., None]], -1)   # [D, H, dh+1]
    proj = _FrozenProj(w.reshape(w.shape[0], -1), spec.bias.detach() if spec.bias is not None else None)

    def hooks(store, key, *_ctx):
        cap: dict = {}

        def on_proj(_, args):
            cap["o"] = args[0]

        def on_norm(_, args):
            y = args[0]
            y = y.reshape(y.shape[0], -1, y.shape[-1])                          # NHWC → [B, N, D]
            _, sigma = layernorm_stats(y, spec)                                  # [B, N, 1]
            o = cap.pop("o")
            if to_positions is not None:
                o = to_positions(o, cap.get("shape"))
            o = o.reshape(*y.shape[:2], H, dh)
            one = torch.full_like(o[..., :1], 1.0 / H)
            store[key] = torch.cat([o, one], -1).div_(sigma[..., None]).flatten(2)   # in place: one copy, not two
        hs = [] if shape_from is None else [
            shape_from.register_forward_pre_hook(lambda _, args: cap.__setitem__("shape", tuple(args[0].shape)))]
        return hs + [a.proj.register_forward_pre_hook(on_proj), a.post.register_forward_pre_hook(on_norm)]

    return Unit("attn", name, "attn", index, level, hooks, gain, H, dh + 1, proj)


def _final_position_plan(m, family, blocks, units, final: NormSpec, final_mod, positions, npt: int,
                         readout, check, grid, embed_hook, post=(), stream_len=None) -> SpatialPlan:
    """A per-position readout ``z = post(mean_{p ∈ positions} norm(x_L[p]))`` (norm with frozen per-position σ;
    ``positions``: a list, or a function of the sequence length).

    ``stream_len``: the decomposed stream is the first ``stream_len`` positions of the final norm's input
    (CaiT: the class token only); default all."""
    keep = slice(None, stream_len)

    def hooks(store):
        return [final_mod.register_forward_pre_hook(lambda _, args: store.__setitem__("final_in", args[0][:, keep])),
                final_mod.register_forward_hook(lambda _, __, out: store.__setitem__("final_out", out[:, keep]))]

    def finalize(store, convention, first_level) -> ReadoutMaps:
        x = store["final_in"]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dt)
        B, n, D = x.shape
        pos = positions(n) if callable(positions) else positions
        mu, sigma = layernorm_stats(x[:, pos], final)                           # [B, P, 1]
        w = torch.zeros(B, 1, n, dtype=dt, device=x.device)
        w[:, 0, pos] = 1.0 / (len(pos) * sigma[..., 0])
        offset = norm_offset(final, mu / sigma, convention).mean(1)
        total = store["final_out"][:, pos].to(dt).mean(1)                       # the real readout (diagnostics)

        def lin(level, P):
            return norm_linear(final, P[:, :, 0], convention)
        return ReadoutMaps({0: w}, lin, offset, total, post=list(post))

    # fixed readout positions (DeiT distilled's two tokens): units keep only the stream's prefix up to them
    prefix = max(positions) + 1 if not callable(positions) and stream_len is None else None
    return SpatialPlan(family=family, root=m, blocks=blocks, units=units, readout=readout, check_input=check,
                       embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks, finalize=finalize,
                       grids=lambda hw: {0: grid(hw)}, num_prefix_tokens=npt, prefix=prefix)


def _register_deit() -> None:
    from timm.models.deit import VisionTransformerDistilled

    @register_rule("model", VisionTransformerDistilled)
    def deit_distilled(m: nn.Module) -> SpatialPlan:
        """DeiT distilled: ``z = (LN(x_L)[cls] + LN(x_L)[dist]) / 2`` — what timm's
        ``forward_head(pre_logits=True)`` returns (the mean of the class and distillation tokens after the
        final norm; the two linear heads ``head`` and ``head_dist`` read the same two tokens). The final
        norm's σ differs between the two tokens, so the readout weighs them ``1/(2σ_cls)``, ``1/(2σ_dist)``
        (a per-position readout). Token terms are per position of the last stream."""
        if m.global_pool != "token":
            raise UnsupportedModuleError(f"DeiT distilled with global_pool={m.global_pool!r}: the head reads the class "
                                         "and distillation tokens")
        final = rule_for("norm", "norm", m.norm)(m.norm)
        if final.kind not in ("layernorm", "rmsnorm"):
            raise UnsupportedModuleError(f"norm: final norm of kind {final.kind} is not supported for DeiT distilled")
        rule_for("scale", "head_drop", m.head_drop)
        blocks, units = _rule_units("blocks", m.blocks)
        pe = m.patch_embed
        check = _size_check(m, "this DeiT distilled model")

        def embed_hook(module, store):
            return [module.register_forward_pre_hook(lambda _, args: store.__setitem__("embed", args[0]))]

        return _final_position_plan(
            m, "timm-deit-distilled", blocks, units, final, m.norm, [0, 1], m.num_prefix_tokens,
            lambda x: m.forward_head(m.forward_features(x), pre_logits=True), check, _patch_grid(pe), embed_hook)


# ---------------------------------------------------------------------------------------------- CaiT
def _register_cait() -> None:
    from timm.models.cait import Cait, ClassAttn, LayerScaleBlockClassAttn

    @register_rule("attention", ClassAttn)
    def class_attention(path: str, module: nn.Module) -> AttentionRule:
        """CaiT class attention (the class token's query over ``[cls, patches]``): heads meet only in
        ``proj``; used inside CaiT's per-position plan (one position, the class token)."""
        from .attention import _PositionsOnly

        return _PositionsOnly(path, module, module.num_heads, module.proj.in_features // module.num_heads)

    @register_rule("block", LayerScaleBlockClassAttn)
    def class_attention_block(path: str, module: nn.Module) -> BlockRule:
        """``x_cls += dp(γ1 ⊙ attn(n1([x_cls, x])))``, ``x_cls += dp(γ2 ⊙ mlp(n2(x_cls)))``."""
        return _make(path, module, "attn", "mlp", ("drop_path",), ("drop_path",), module.gamma_1, module.gamma_2)

    @register_rule("model", Cait)
    def cait(m: nn.Module) -> SpatialPlan:
        """CaiT: the readout is the class token after the final norm, ``z = LN(x_cls)`` (``global_pool='token'``).

        The class token enters only at the class-attention blocks ``blocks_token_only.<i>``, which update
        it alone: ``x_cls += γ1 ⊙ attn(n1([x_cls, x]))[cls]``, ``x_cls += γ2 ⊙ mlp(n2(x_cls))``. So the direct
        effects on the readout are: ``embed`` (the learned class token — input-independent), the heads of
        every class-attention block (with its own LayerScale ``γ1``) and their MLPs (``γ2``). The
        self-attention blocks ``blocks.<i>`` update only the patch tokens; they reach the readout only
        through the class attention's keys and values, i.e. not directly, so they are not components
        (their effect is inside the class-attention heads). The ``blocks`` option indexes the
        class-attention blocks. Token terms are per position of the class-token stream (one position).
        """
        if m.global_pool != "token":
            raise UnsupportedModuleError(f"CaiT global_pool={m.global_pool!r}: only the class-token readout is decomposed")
        final = rule_for("norm", "norm", m.norm)(m.norm)
        if final.kind not in ("layernorm", "rmsnorm"):
            raise UnsupportedModuleError(f"norm: final norm of kind {final.kind} is not supported for CaiT")
        rule_for("scale", "head_drop", m.head_drop)
        from .families import block_units

        blocks, units = [], []
        for i, blk in enumerate(m.blocks_token_only):
            path = f"blocks_token_only.{i}"
            blocks.append((i, path, blk))
            units += block_units(rule_for("block", path, blk)(path, blk), i, 0)
        if not blocks:
            raise UnsupportedModuleError("blocks_token_only: CaiT without class-attention blocks is not decomposed")
        pe = m.patch_embed

        def embed_hook(module, store):                     # the class token entering this block: args (x, x_cls)
            return [module.register_forward_pre_hook(lambda _, args: store.__setitem__("embed", args[1]))]

        def readout(x):
            return m.forward_head(m.forward_features(x), pre_logits=True)

        # the final norm's input is [class token, patches]: the readout weighs position 0 only
        return _final_position_plan(m, "timm-cait", blocks, units, final, m.norm, [0], 0, readout,
                                    _fixed_size_check(pe.img_size, "this CaiT"), lambda hw: (1, 1), embed_hook,
                                    stream_len=1)


for _register in (_register_beit, _register_relpos, _register_eva_post_norm, _register_diff, _register_parallel,
                  _register_deit, _register_respost,
                  _register_cait):
    _register()
del _register

__all__ = ["ProjInputAttention", "TimmPostNormAttention"]
