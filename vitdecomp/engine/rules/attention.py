"""Attention rules: split an attention branch's pooled output into heads (and source tokens).

Per head ``h``, readout query weights ``w [B, S]`` over the pooled positions ``S`` and source
token ``m`` (README “Components and names”)::

    α_h[m]   = Σ_s w[s] · softmax_m(q_h[s]·k_h[m] · scale)       readout attention row  [B, H, N]
    head_h   = (Σ_m α_h[m] v_h[m]) · W_O,hᵀ                      (value bias inside v)  [B, H, D]
    token_hm = α_h[m] v_h[m] · W_O,hᵀ                                                   [B, N, D]

and the out-projection bias is returned separately. Only the readout rows of attention are
recomputed; the model keeps running its own (fused) kernels. A sub-LayerNorm between the heads
and the out-projection (timm ``scale_norm``) is frozen at its per-position statistics: its ``1/σ``
folds into ``w``, its centring is applied per head, its ``β`` joins the bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .registry import register_rule, rule_for
from .affine import NormSpec, layernorm_stats


@dataclass
class AttnResult:
    """What an attention rule reports after its module ran, all in the compute dtype.

    ``branch``: the pooled real output of the module ``[B, D]``;
    ``heads``: pooled per-head contributions ``[B, H, D]`` (None when heads are off);
    ``bias``: input-independent part of ``branch`` not in any head ``[D]`` (None when heads are off);
    ``tokens``: head index → per-source-token terms ``[B, N, D]`` (sum over N = that head).
    """

    branch: Tensor
    heads: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    tokens: dict[int, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ pure math
def readout_rows(scores: Tensor, w: Tensor) -> Tensor:
    """``scores [B, H, S, N]`` (pre-softmax, scaled) and query weights ``w [B, S]`` → ``α [B, H, N]``."""
    return torch.einsum("bs,bhsn->bhn", w, scores.softmax(-1))


def out_project(vt: Tensor, w_o: Tensor, subln: Optional[tuple[Tensor, Tensor, int]] = None) -> Tensor:
    """Per-head out-projection of head values ``vt [B, H', T, dh]`` → ``[B, H', T, D]``.

    ``w_o [D, H', dh]`` is the out-projection restricted to the heads in ``vt``. ``subln`` =
    ``(gamma [H', dh], w_o_gamma [D], width)`` describes a frozen sub-LayerNorm of total ``width``
    (all heads) before the out-projection, with its ``1/σ`` already folded into ``vt``: each head's
    zero-padded slice ``p`` is centred over the full width, ``γ⊙(p − Σp/width)``, so the head gives
    ``(γ_h⊙v)·W_O,hᵀ − (Σv/width)·(W_O γ)`` with ``W_O γ`` over the full width.
    """
    if subln is None:
        return torch.einsum("bhtd,ehd->bhte", vt, w_o)
    gamma, w_o_gamma, width = subln
    out = torch.einsum("bhtd,ehd->bhte", vt * gamma[None, :, None, :], w_o)
    return out - (vt.sum(-1, keepdim=True) / width) * w_o_gamma


def _subln_parts(spec: NormSpec, w_o: Tensor, heads: list[int], dh: int, dtype) -> Optional[tuple]:
    if spec.kind == "identity":
        return None
    if spec.kind != "layernorm":
        raise UnsupportedModuleError(f"sub-norm of kind {spec.kind} before the out-projection is not supported")
    width = w_o.shape[1]
    gamma = spec.weight.to(dtype) if spec.weight is not None else torch.ones(width, dtype=dtype, device=w_o.device)
    w_o = w_o.to(dtype)
    return gamma.view(-1, dh)[heads], w_o @ gamma, width


def _subln_bias(spec: NormSpec, w_o: Tensor, dtype) -> Optional[Tensor]:
    if spec.kind == "layernorm" and spec.bias is not None:
        return w_o.to(dtype) @ spec.bias.to(dtype)
    return None


# ----------------------------------------------------------------------------------- the rules
class AttentionRule:
    """Base: hooks on one attention module; an instance is made per module (``rule(path, module)``).

    Two ways the engine uses it (``ctx`` is a :class:`~.context.RuleContext`):

    - :meth:`hooks` (static readouts: CLS token, mean pooling; ``ctx.pooling`` is set): register
      forward hooks that call ``sink(AttnResult)`` once the module has run, with the branch output
      and, when ``ctx.heads``, the heads pooled with ``ctx.pooling``;
    - :meth:`position_hooks` (per-position readouts: attention pool, Swin, MaxViT;
      ``ctx.pooling`` is None): call ``sink(t)`` with the out-projection's input ``t [..., H·dh]`` as
      the module computed it (heads concatenated, partitioned positions as the module saw them; the
      block rule undoes partitions). The default hooks :meth:`out_proj`'s input, which is exact for
      any attention whose heads meet only in that Linear.

    Set ``num_heads`` and ``head_dim`` in ``__init__``.
    """

    num_heads: int
    head_dim: int

    def __init__(self, path: str, module: nn.Module):
        self.path, self.module = path, module

    def hooks(self, ctx, sink: Callable[[AttnResult], None]) -> list:
        raise UnsupportedModuleError(f"{self.path}: {type(self).__qualname__} has no hooks() for a CLS / mean-pooled "
                                     "readout; implement AttentionRule.hooks")

    def out_proj(self) -> nn.Linear:
        """The out-projection Linear whose input is the concatenated head outputs (nothing in between)."""
        proj = getattr(self.module, "proj", None)
        if not isinstance(proj, nn.Linear):
            raise UnsupportedModuleError(f"{self.path}.proj: {type(proj).__qualname__} is not an nn.Linear "
                                         "out-projection; override AttentionRule.out_proj/position_hooks")
        return proj

    def position_hooks(self, ctx, sink: Callable[[Tensor], None]) -> list:
        """Per-position readouts: report the out-projection's input (see the class docstring)."""
        return [self.out_proj().register_forward_pre_hook(lambda _, args: sink(args[0]))]


def emit(ctx, sink: Callable[[AttnResult], None], cap: dict, out: Tensor, split: Callable[[AttnResult], None]) -> None:
    """The end of a static-readout attention hook: pool the branch output ``out [B, N, D]`` at the readout,
    let ``split(result)`` fill the heads (and tokens) when heads are asked for, clear ``cap`` and hand
    the result to ``sink``."""
    with ctx.exact():
        res = AttnResult(branch=ctx.pooling.pool(out.to(ctx.dtype)))
        if ctx.heads:
            split(res)
    cap.clear()
    sink(res)


def _no_mask(path: str, kwargs: dict, *names: str) -> None:
    for n in names:
        if kwargs.get(n) not in (None, False):
            raise UnsupportedModuleError(f"{path}: attention called with {n}={kwargs[n]!r}; only unmasked "
                                         "self-attention (as in vision towers) is decomposed")


class SubnormAttention(AttentionRule):
    """Base of timm's ``Attention`` and EVA's attention rules: ungated, ``num_heads``/``head_dim`` on the
    module, an optional sub-norm ``norm`` before ``proj`` (per-position readouts refuse it)."""

    gated = "gated attention"

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        if getattr(module, "gate", None) is not None:
            raise UnsupportedModuleError(f"{path}: {self.gated} is not supported yet")
        self.num_heads, self.head_dim = module.num_heads, module.head_dim
        self.subnorm = rule_for("norm", f"{path}.norm", module.norm)(module.norm)

    def out_proj(self) -> nn.Linear:
        if self.subnorm.kind != "identity":
            raise UnsupportedModuleError(f"{self.path}.norm: attention sub-norm with a per-position readout is not "
                                         "supported yet")
        return super().out_proj()


class TimmAttention(SubnormAttention):
    """timm ``Attention``: fused qkv Linear, optional q/k norms, optional sub-norm, proj Linear."""

    gated = "gated timm Attention (gate=True)"

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        if not isinstance(module.qkv, nn.Linear):
            raise UnsupportedModuleError(f"{path}.qkv: {type(module.qkv).__qualname__} is not an nn.Linear")

    def hooks(self, ctx, sink):
        m, cap = self.module, {}
        k_plain = isinstance(m.k_norm, nn.Identity)

        def pre(_, args, kwargs):
            _no_mask(self.path, kwargs, "attn_mask", "is_causal")
            cap.clear()
            cap["x"] = args[0] if args else kwargs["x"]

        def on_q(_, __, out):
            cap["q"] = out

        def on_k(_, __, out):
            cap["k"] = out

        def on_heads(_, args):                     # the heads' values as the model computed them
            cap["o"] = args[0]

        def post(_, __, out):
            emit(ctx, sink, cap, out, lambda res: self._split(ctx, cap, res, out.shape[1], k_plain))

        target = m.norm if self.subnorm.kind != "identity" else m.proj
        handles = [m.register_forward_pre_hook(pre, with_kwargs=True),
                   m.q_norm.register_forward_hook(on_q),
                   target.register_forward_pre_hook(on_heads),
                   m.register_forward_hook(post)]
        if not k_plain:
            handles.append(m.k_norm.register_forward_hook(on_k))
        return handles

    def _split(self, ctx, cap, res: AttnResult, n: int, k_plain: bool) -> None:
        """Heads from the out-projection's input ``o`` (each head's attention-weighted values as the
        model computed them) pooled with the readout's query weights — no attention is recomputed, so
        mean pooling costs O(B·N·D), not a second ``[B, H, N, N]`` score tensor. Token terms (requested
        heads only) recompute the readout rows from the captured input ``x`` and queries; no copy of
        keys or values:

        ``q_h·k_h[m] = (W_k,hᵀ q_h)·x[m] + q_h·b_k,h`` (the second term is constant over ``m`` and
        cancels in the softmax) when ``k_norm`` is the identity; ``Σ_m α[m] v_h[m] = (Σ_m α[m]
        x[m]) W_v,hᵀ + b_v,h`` because ``Σ_m α[m] = 1``.
        """
        m, H, dh, dt = self.module, self.num_heads, self.head_dim, ctx.dtype
        pos = ctx.pooling.positions(n)
        o = cap["o"][:, pos].to(dt)                                          # [B, S, H·dh]
        w = ctx.pooling.weights(n, o.shape[0], dt, o.device)                 # [B, S]
        if self.subnorm.kind != "identity":
            _, sigma = layernorm_stats(o, self.subnorm)
            w = w / sigma[..., 0]
        w_o = m.proj.weight.to(dt).view(-1, H, dh)                           # [D, H, dh]
        subln = _subln_parts(self.subnorm, m.proj.weight, list(range(H)), dh, dt)
        res.heads = out_project(pooled_head_values(o, w, H, dh), w_o, subln)[:, :, 0]
        res.bias = _bias(m.proj.bias, _subln_bias(self.subnorm, m.proj.weight, dt), w_o)
        wanted = ctx.token_heads(self.path)
        if not wanted:
            return
        x = cap["x"].to(dt)                                                  # [B, N, D]
        D = x.shape[-1]
        w_qkv = m.qkv.weight.to(dt)
        b_qkv = m.qkv.bias.to(dt) if m.qkv.bias is not None else torch.zeros(3 * H * dh, dtype=dt, device=x.device)
        w_k, w_v = w_qkv[H * dh:2 * H * dh].view(H, dh, D), w_qkv[2 * H * dh:].view(H, dh, D)
        b_v = b_qkv[2 * H * dh:].view(H, dh)
        q = cap["q"][:, :, pos].to(dt)                                       # [B, H, S, dh]
        if k_plain:
            q_tilde = torch.einsum("bhsd,hde->bhse", q, w_k)                 # [B, H, S, D]
            scores = torch.einsum("bhse,bne->bhsn", q_tilde, x)
        else:
            scores = torch.einsum("bhsd,bhnd->bhsn", q, cap["k"].to(dt))
        alpha = readout_rows(scores * m.scale, w)                            # [B, H, N]
        for h in wanted:
            v_h = torch.einsum("bne,de->bnd", x, w_v[h]) + b_v[h]               # [B, N, dh]
            terms = (alpha[:, h, :, None] * v_h)[:, None]                    # [B, 1, N, dh]
            sub = None if subln is None else (subln[0][h:h + 1], subln[1], subln[2])
            res.tokens[h] = out_project(terms, w_o[:, h:h + 1], sub)[:, 0]



def _bias(out_bias: Optional[Tensor], extra: Optional[Tensor], like: Tensor) -> Tensor:
    b = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    if out_bias is not None:
        b = b + out_bias.to(like.dtype)
    if extra is not None:
        b = b + extra
    return b


@register_rule("attention", nn.MultiheadAttention)
class MultiheadAttentionRule(AttentionRule):
    """``torch.nn.MultiheadAttention`` used as self-attention (open_clip vision towers).

    The module's in-projection is not a submodule, so nothing inside it can be hooked; only its
    input is captured. The readout rows need no full keys or values: with ``q̃_h = W_k,hᵀ q_h``,
    ``q_h·k_h[m] = q̃_h·x[m] + const`` (the constant cancels in the softmax), and
    ``Σ_m α[m] v_h[m] = (Σ_m α[m] x[m]) W_v,hᵀ + b_v,h``. Cost O(B·H·N·D) per block.
    """

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        if not module._qkv_same_embed_dim:
            raise UnsupportedModuleError(f"{path}: MultiheadAttention with separate kdim/vdim is not supported")
        if module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedModuleError(f"{path}: MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        self.num_heads, self.head_dim = module.num_heads, module.head_dim

    def out_proj(self) -> nn.Linear:
        raise UnsupportedModuleError(f"{self.path}: nn.MultiheadAttention computes its heads inside one function "
                                     "call; it is decomposed only with a CLS / mean-pooled readout")

    def out_linear(self) -> nn.Linear:
        """Per-position readouts (open_clip CoCa's attentional pooler): the out-projection, applied
        functionally by the module to the heads :meth:`position_hooks` recomputes."""
        return self.module.out_proj

    def position_hooks(self, ctx, sink):
        """Per-position readouts: the out-projection's input ``softmax(q kᵀ/√dh) v`` (heads concatenated,
        ``[B, N, H·dh]``) recomputed from the module's captured input with its own in-projection — the
        functional call hides it. One ``[B, H, N, N]`` attention map per block, as the module computes."""
        m, cap = self.module, {}
        pre = self._capture(cap)

        def post(_, __, out):
            dt = ctx.dtype if ctx is not None else cap["x"].dtype
            with (ctx.exact() if ctx is not None else torch.no_grad()):
                x = cap.pop("x").to(dt)
                B, n, D = x.shape
                H, dh = self.num_heads, self.head_dim
                b_in = m.in_proj_bias.to(dt) if m.in_proj_bias is not None else None
                q, k, v = (t.view(B, n, H, dh).transpose(1, 2)
                           for t in torch.nn.functional.linear(x, m.in_proj_weight.to(dt), b_in).split(D, -1))
                o = torch.softmax((q * dh ** -0.5) @ k.transpose(-2, -1), -1) @ v          # [B, H, N, dh]
                sink(o.transpose(1, 2).reshape(B, n, H * dh))

        return [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]

    def _capture(self, cap: dict):
        m = self.module

        def pre(_, args, kwargs):
            names = ("query", "key", "value")
            given = {**dict(zip(names, args)), **{k: kwargs[k] for k in names if k in kwargs}}
            if not (given.get("key") is given["query"] and given.get("value") is given["query"]):
                raise UnsupportedModuleError(f"{self.path}: only self-attention (query is key is value) is decomposed")
            _no_mask(self.path, kwargs, "attn_mask", "key_padding_mask", "is_causal")
            x = given["query"]
            cap["x"] = x if m.batch_first else x.transpose(0, 1)
        return pre

    def hooks(self, ctx, sink):
        m, cap = self.module, {}
        pre = self._capture(cap)

        def post(_, __, out):
            y = out[0] if m.batch_first else out[0].transpose(0, 1)
            emit(ctx, sink, cap, y, lambda res: self._split(ctx, cap["x"].to(ctx.dtype), res))

        return [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]

    def _split(self, ctx, x: Tensor, res: AttnResult) -> None:
        m, H, dh, dt = self.module, self.num_heads, self.head_dim, ctx.dtype
        B, n, D = x.shape
        w_in = m.in_proj_weight.to(dt)
        b_in = m.in_proj_bias.to(dt) if m.in_proj_bias is not None else torch.zeros(3 * D, dtype=dt, device=x.device)
        w_q, w_k, w_v = (w_in[i * D:(i + 1) * D].view(H, dh, D) for i in range(3))
        b_q, b_v = b_in[:D].view(H, dh), b_in[2 * D:].view(H, dh)
        pos = ctx.pooling.positions(n)
        q = torch.einsum("bse,hde->bhsd", x[:, pos], w_q) + b_q[None, :, None]      # [B, H, S, dh]
        q_tilde = torch.einsum("bhsd,hde->bhse", q, w_k)                             # [B, H, S, D]
        scores = torch.einsum("bhse,bne->bhsn", q_tilde, x) * dh ** -0.5
        alpha = readout_rows(scores, ctx.pooling.weights(n, B, dt, x.device))       # [B, H, N]
        xt = torch.einsum("bhn,bne->bhe", alpha, x)
        vt = torch.einsum("bhe,hde->bhd", xt, w_v) + b_v                             # Σα = 1
        w_o = m.out_proj.weight.to(dt).view(D, H, dh)
        res.heads = out_project(vt[:, :, None], w_o)[:, :, 0]
        res.bias = _bias(m.out_proj.bias, None, w_o)
        for h in ctx.token_heads(self.path):
            v_h = torch.einsum("bne,de->bnd", x, w_v[h]) + b_v[h]                   # [B, N, dh]
            res.tokens[h] = out_project((alpha[:, h, :, None] * v_h)[:, None], w_o[:, h:h + 1])[:, 0]


class _PositionsOnly(AttentionRule):
    """Attention used only inside per-position readouts (windowed or partitioned positions)."""

    def __init__(self, path: str, module: nn.Module, heads: int, head_dim: int):
        super().__init__(path, module)
        self.num_heads, self.head_dim = int(heads), int(head_dim)
        self.out_proj()


def _register_timm() -> None:
    from timm.layers.attention import Attention
    from timm.models.maxxvit import AttentionCl
    from timm.models.swin_transformer import WindowAttention

    register_rule("attention", Attention)(TimmAttention)

    @register_rule("attention", WindowAttention)
    def swin_window_attention(path: str, module: nn.Module) -> AttentionRule:
        """Swin ``WindowAttention`` (relative position bias, shift mask): heads meet only in ``proj``."""
        return _PositionsOnly(path, module, module.num_heads, module.proj.in_features // module.num_heads)

    @register_rule("attention", AttentionCl)
    def maxvit_attention(path: str, module: nn.Module) -> AttentionRule:
        """MaxViT channels-last partition attention (relative position bias): heads meet only in ``proj``."""
        return _PositionsOnly(path, module, module.num_heads, module.dim_head)


_register_timm()


# ------------------------------------------------------------------------------- EVA attention
def pooled_head_values(o: Tensor, w: Tensor, H: int, dh: int) -> Tensor:
    """Pool per-position head outputs ``o [B, S, H·dh]`` (the out-projection's input at the pooled
    positions) with query weights ``w [B, S]`` → ``[B, H, 1, dh]`` (input of :func:`out_project`)."""
    return torch.einsum("bs,bshd->bhd", w, o.view(*o.shape[:2], H, dh))[:, :, None]


def _register_eva() -> None:
    from timm.layers import apply_rot_embed_cat
    from timm.models.eva import EvaAttention

    @register_rule("attention", EvaAttention)
    class EvaAttentionRule(SubnormAttention):
        """timm ``EvaAttention`` (EVA-02): rotary position embeddings, optional sub-LayerNorm.

        Rotary embeddings only change the attention probabilities. The heads are read from the
        out-projection's input (each head's attention-weighted values, as the model's own kernel
        computed them) pooled over the readout positions, so no attention row is recomputed for the
        heads. Token terms need the readout rows: queries and keys are recomputed from the captured
        input with timm's own rotary function and the ``rope`` tensor the block received.
        """

        gated = "gated EvaAttention"

        def hooks(self, ctx, sink):
            m, cap = self.module, {}
            target = m.norm if self.subnorm.kind != "identity" else m.proj

            def pre(_, args, kwargs):
                _no_mask(self.path, kwargs, "attn_mask", "is_causal")
                cap.clear()
                cap["x"] = args[0] if args else kwargs["x"]
                cap["rope"] = kwargs.get("rope", args[1] if len(args) > 1 else None)

            def on_heads(_, args):
                cap["o"] = args[0]

            def post(_, __, out):
                emit(ctx, sink, cap, out, lambda res: self._split(ctx, cap, res, out.shape[1]))

            return [m.register_forward_pre_hook(pre, with_kwargs=True),
                    target.register_forward_pre_hook(on_heads), m.register_forward_hook(post)]

        def _qkv(self, x: Tensor, rope: Optional[Tensor], dt) -> tuple[Tensor, Tensor, Tensor]:
            """Queries, keys (after q/k norms and rotary embedding) and values, ``[B, H, N, dh]``."""
            m, H = self.module, self.num_heads
            B, N, _ = x.shape
            if m.qkv is not None:
                bias = None if m.q_bias is None else torch.cat((m.q_bias, m.k_bias, m.v_bias)).to(dt)
                q, k, v = F.linear(x, m.qkv.weight.to(dt), bias).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                q, k, v = (F.linear(x, p.weight.to(dt), None if p.bias is None else p.bias.to(dt))
                           .reshape(B, N, H, -1).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
            return self._rotate(m.q_norm(q), m.k_norm(k), v, rope, dt)

        def _rotate(self, q: Tensor, k: Tensor, v: Tensor, rope: Optional[Tensor], dt) -> tuple[Tensor, Tensor, Tensor]:
            """timm's rotary embedding on the non-prefix positions of (normed) queries and keys."""
            m = self.module
            if rope is not None:
                npt, half = m.num_prefix_tokens, getattr(m, "rotate_half", False)
                rope = rope.to(dt)
                q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
                k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
            return q, k, v

        def _split(self, ctx, cap, res: AttnResult, n: int) -> None:
            m, H, dh, dt = self.module, self.num_heads, self.head_dim, ctx.dtype
            pos = ctx.pooling.positions(n)
            o = cap["o"][:, pos].to(dt)                                          # [B, S, H·dh]
            B = o.shape[0]
            w = ctx.pooling.weights(n, B, dt, o.device)                          # [B, S]
            if self.subnorm.kind != "identity":
                _, sigma = layernorm_stats(o, self.subnorm)
                w = w / sigma[..., 0]
            w_o = m.proj.weight.to(dt).view(-1, H, dh)
            subln = _subln_parts(self.subnorm, m.proj.weight, list(range(H)), dh, dt)
            res.heads = out_project(pooled_head_values(o, w, H, dh), w_o, subln)[:, :, 0]
            res.bias = _bias(m.proj.bias, _subln_bias(self.subnorm, m.proj.weight, dt), w_o)
            wanted = ctx.token_heads(self.path)
            if wanted:
                q, k, v = self._qkv(cap["x"].to(dt), cap["rope"], dt)
                scores = torch.einsum("bhsd,bhnd->bhsn", q[:, :, pos], k) * m.scale
                alpha = readout_rows(scores, w)                                  # [B, H, N]
                for h in wanted:
                    terms = (alpha[:, h, :, None] * v[:, h])[:, None]            # [B, 1, N, dh]
                    sub = None if subln is None else (subln[0][h:h + 1], subln[1], subln[2])
                    res.tokens[h] = out_project(terms, w_o[:, h:h + 1], sub)[:, 0]

    return EvaAttentionRule


EvaAttentionRule = _register_eva()


# ------------------------------------------------------------------------------- AttentionRope (Perception Encoder)
def _register_rope() -> None:
    from timm.layers.attention import AttentionRope

    @register_rule("attention", AttentionRope)
    class AttentionRopeRule(EvaAttentionRule):
        """timm ``AttentionRope`` (Perception Encoder blocks): ``EvaAttention``'s computation (rotary
        embeddings after the q/k norms, optional ``scale_norm`` sub-norm) with the qkv bias inside the
        fused Linear and optional grouped-query K/V heads (repeated per query head after the rotary
        embedding, as timm does). Heads are read from the out-projection input as for EVA."""

        gated = "gated AttentionRope"

        def _qkv(self, x: Tensor, rope: Optional[Tensor], dt) -> tuple[Tensor, Tensor, Tensor]:
            m, H, dh = self.module, self.num_heads, self.head_dim
            B, N, _ = x.shape

            def lin(p):
                return F.linear(x, p.weight.to(dt), None if p.bias is None else p.bias.to(dt))
            if m.qkv is not None:
                q, k, v = lin(m.qkv).reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
            else:
                kvh = m.num_kv_heads
                q = lin(m.q_proj).reshape(B, N, H, dh).transpose(1, 2)
                k, v = (lin(p).reshape(B, N, kvh, dh).transpose(1, 2) for p in (m.k_proj, m.v_proj))
            q, k, v = self._rotate(m.q_norm(q), m.k_norm(k), v, rope, dt)
            if m.num_kv_groups > 1:
                k = k.repeat_interleave(m.num_kv_groups, dim=1)
                v = v.repeat_interleave(m.num_kv_groups, dim=1)
            return q, k, v


_register_rope()
