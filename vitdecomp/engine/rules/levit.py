"""timm LeViT (``timm.models.levit.Levit`` / ``LevitDistilled``, linear and ``use_conv`` variants).

Forward (timm): a convolutional stem (``Stem16``/``Stem8``: 3×3 stride-2 ``ConvNorm`` + activation), the
tokens flattened (linear variants; ``levit_conv_*`` keep ``[B, C, H, W]``), then ``stages.<s>``: an
optional ``LevitDownsample`` and residual ``LevitBlock``\\ s::

    LevitBlock:       x = x + attn(x);  x = x + mlp(x)              (DropPath: identity in eval)
    LevitDownsample:  x = attn_downsample(x);  x = x + mlp(x)       (the stream is *replaced*)

and ``z = forward_head(·, pre_logits=True)`` = the mean over the last stage's positions (``global_pool=
'avg'``, no final norm; ``LevitDistilled``'s two heads read the same pooled vector). Every linear map is
``LinearNorm`` / ``ConvNorm`` (a bias-free Linear or 1×1 conv, then BatchNorm in eval mode: a per-channel
affine map). An attention's out-projection is ``proj = Sequential(act, ln)``: the element-wise activation
(Hardswish, or SiLU for the ``*_s8``/wide variants) acts per channel and each channel belongs to one head,
so the heads meet only in ``proj.ln``: with ``a = act(attention-weighted values)`` (hooked, as the model
computed it), head ``h``'s direct effect is ``W'_h a_h`` with ``W' = diag(γ/√(var+eps)) W`` and the
BatchNorm shift ``β − γ·mean/√(var+eps)`` goes to ``bias`` (split over the heads under ``uniform``), as for
any out-projection bias. Exact per head — but **not** linear in the attention-weighted values, so there
are no per-source-token terms for LeViT: asking for ``tokens`` raises
:class:`~vitdecomp.errors.UnsupportedModuleError`.

Which components: ``AttentionDownsample`` replaces the stream with ``proj(act(attention over a
subsampled query))``: everything before it reaches the readout only through that non-linear map, never
additively. So the exact direct-effect decomposition starts at the *last* ``LevitDownsample``
(``stages.<S>.downsample``, block 0 of the ``blocks`` option): its heads
(``stages.<S>.downsample.attn_downsample.head.<h>``) and its residual MLP (``stages.<S>.downsample.mlp``)
are components, then every later ``LevitBlock`` (``stages.<s>.blocks.<i>.attn.head.<h>``,
``stages.<s>.blocks.<i>.mlp``; block indices 1, 2, … over these blocks only). The stem and the earlier
stages are the input of the last downsample — the keys, values and queries of its heads, like a hybrid
stem's features — and not additive, so ``embed`` is **zero** when the last downsample is decomposed;
with ``blocks`` starting at a later block, ``embed`` is the pooled stream entering that block. A LeViT
without downsample (one stage) decomposes from its first block, ``embed`` = the stem's tokens. MLP
components include their BatchNorm shifts (like a ViT MLP's ``fc2`` bias).

The readout is a static mean over positions, pooled inside the hooks (no per-position tensor is kept).

Refused (:class:`~vitdecomp.errors.UnsupportedModuleError`): ``global_pool=''`` (no pooled readout),
BatchNorm without running statistics (batch statistics are not a per-image affine map), a non-1×1 or
grouped out-projection conv, an activation in ``proj`` that is not a known element-wise one, token terms.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ...errors import InputError, UnsupportedModuleError
from .attention import AttentionRule, AttnResult
from .blocks import BlockRule, Branch, _gain
from .pool import Pooling
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan, Unit

# activations that act on each channel separately (the heads then meet only in ``proj.ln``)
_ELEMENTWISE = (nn.Hardswish, nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Sigmoid,
                nn.Hardsigmoid, nn.Tanh, nn.Identity)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mean(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Mean over positions: ``[B, N, C]`` (linear LeViT) or ``[B, C, H, W]`` (``use_conv``) → ``[B, C]``."""
    t = t.to(dtype)
    return t.mean(1) if t.dim() == 3 else t.mean((2, 3))


def _check_elementwise(path: str, act: nn.Module) -> None:
    if not (isinstance(act, _ELEMENTWISE) or type(act).__module__.startswith("timm.layers.activations")):
        raise UnsupportedModuleError(
            f"{path}: {type(act).__module__}.{type(act).__qualname__} is not a known element-wise activation; a LeViT "
            "out-projection is split into heads only when its activation acts on each channel separately "
            "(Hardswish, SiLU, GELU, ReLU, …)")


def _check_bn(path: str, bn: nn.Module) -> None:
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModuleError(
            f"{path}: {type(bn).__qualname__} without running statistics; only BatchNorm in eval mode with running "
            "statistics (track_running_stats=True, timm's default) is a per-channel affine map")


def _check_linear_norm(path: str, ln: nn.Module) -> None:
    """A timm LeViT ``LinearNorm`` / ``ConvNorm``: bias-free Linear or 1×1 conv, then BatchNorm."""
    from timm.models.levit import ConvNorm, LinearNorm

    if not isinstance(ln, (LinearNorm, ConvNorm)) or type(ln).forward not in (LinearNorm.forward, ConvNorm.forward):
        raise UnsupportedModuleError(f"{path}: {type(ln).__qualname__} is not timm's levit.LinearNorm / ConvNorm")
    lin = ln.linear
    if isinstance(lin, nn.Conv2d) and (tuple(lin.kernel_size) != (1, 1) or tuple(lin.stride) != (1, 1)
                                       or tuple(lin.padding) != (0, 0) or lin.groups != 1):
        raise UnsupportedModuleError(f"{path}.linear: only a 1×1, stride-1, ungrouped conv out-projection is a "
                                     "per-position linear map")
    _check_bn(f"{path}.bn", ln.bn)


def folded(ln: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``LinearNorm`` / ``ConvNorm`` (eval) as one per-position affine map: ``weight [D, C]``, ``bias [D]``
    (``diag(γ/√(var+eps)) W`` and ``β − γ·mean/√(var+eps)``, plus the conv/Linear bias if any)."""
    lin, bn = ln.linear, ln.bn
    w = lin.weight.to(dtype)
    w = w[:, :, 0, 0] if w.dim() == 4 else w
    inv = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    scale = inv * bn.weight.to(dtype) if bn.weight is not None else inv
    shift = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(scale)
    b_lin = lin.bias.to(dtype) if lin.bias is not None else torch.zeros_like(scale)
    return w * scale[:, None], (b_lin - bn.running_mean.to(dtype)) * scale + shift


class LevitAttentionRule(AttentionRule):
    """timm LeViT ``Attention`` / ``AttentionDownsample``: heads meet only in ``proj.ln`` (after the
    element-wise ``proj.act``). Mean-pooled readout only; no token terms (see the module docstring)."""

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        self.num_heads, self.head_dim = int(module.num_heads), int(module.val_dim)
        proj = module.proj
        if not (isinstance(proj, nn.Sequential) and hasattr(proj, "act") and hasattr(proj, "ln") and len(proj) == 2):
            raise UnsupportedModuleError(f"{path}.proj: expected timm LeViT's Sequential(act, ln) out-projection")
        _check_elementwise(f"{path}.proj.act", proj.act)
        _check_linear_norm(f"{path}.proj.ln", proj.ln)
        if proj.ln.linear.weight.shape[1] != self.num_heads * self.head_dim:
            raise UnsupportedModuleError(f"{path}.proj.ln: input width {proj.ln.linear.weight.shape[1]} is not "
                                         f"num_heads·val_dim = {self.num_heads * self.head_dim}")

    def out_proj(self) -> nn.Linear:
        raise UnsupportedModuleError(f"{self.path}: a LeViT attention's out-projection is act + Linear/conv + "
                                     "BatchNorm; it is decomposed only with LeViT's own mean-pooled readout")

    def hooks(self, ctx, sink: Callable[[AttnResult], None]) -> list:
        if ctx.token_heads(self.path):
            raise UnsupportedModuleError(
                f"{self.path}: per-token contributions are not defined for LeViT: the element-wise activation "
                f"({type(self.module.proj.act).__qualname__}) in the out-projection acts on the attention-weighted "
                "sum of the values, so a head is not a sum of per-source-token terms. Decompose without tokens= "
                "(heads are exact)")
        m, cap = self.module, {}
        H, dh = self.num_heads, self.head_dim

        def on_act(_, args):
            cap["a"] = args[0]

        def post(_, __, out):
            with ctx.exact():
                dt = ctx.dtype
                res = AttnResult(branch=_mean(out, dt))
                if ctx.heads:
                    a = _mean(cap["a"], dt)                                          # [B, H·dh]
                    w, b = folded(m.proj.ln, dt)                                     # [D, H·dh], [D]
                    res.heads = torch.einsum("bhc,dhc->bhd", a.view(-1, H, dh), w.view(-1, H, dh))
                    res.bias = b
            cap.clear()
            sink(res)

        return [m.proj.ln.register_forward_pre_hook(on_act), m.register_forward_hook(post)]


def _register() -> None:
    from timm.models.levit import Attention, AttentionDownsample, Levit, LevitBlock, LevitDistilled, LevitDownsample

    register_rule("attention", Attention, AttentionDownsample)(LevitAttentionRule)

    @register_rule("block", LevitBlock)
    def levit_block(path: str, module: nn.Module) -> BlockRule:
        """``x + dp1(attn(x))``, ``x + dp2(mlp(x))`` (no pre-norms: the BatchNorms are inside the branches)."""
        a = rule_for("attention", f"{path}.attn", module.attn)(f"{path}.attn", module.attn)
        return BlockRule(path, f"{path}.attn", a, f"{path}.mlp", module.mlp,
                         _gain(path, ("drop_path1", module.drop_path1)), _gain(path, ("drop_path2", module.drop_path2)))

    @register_rule("block", LevitDownsample)
    def levit_downsample(path: str, module: nn.Module) -> BlockRule:
        """``attn_downsample(x)`` *replaces* the stream (its heads are the new stream), then ``+ dp(mlp(·))``."""
        p = f"{path}.attn_downsample"
        a = rule_for("attention", p, module.attn_downsample)(p, module.attn_downsample)
        g = _gain(path, ("drop_path", module.drop_path))
        return BlockRule(path, p, a, f"{path}.mlp", module.mlp, None, g,
                         branches=[Branch("attn", p, module.attn_downsample, None, attn=a),
                                   Branch("mlp", f"{path}.mlp", module.mlp, g)])

    @register_rule("model", Levit, LevitDistilled)
    def levit_model(m: nn.Module) -> SpatialPlan:
        return levit_plan(m)


def _decomposed_blocks(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """From the last ``LevitDownsample`` (or the first block when there is none) to the last block."""
    from timm.models.levit import LevitStage

    seq: list[tuple[str, nn.Module]] = []
    for s in range(len(m.stages) - 1, -1, -1):
        st = m.stages[s]
        if not isinstance(st, LevitStage) or type(st).forward is not LevitStage.forward:
            raise UnsupportedModuleError(f"stages.{s}: {type(st).__qualname__} is not timm's levit.LevitStage "
                                         "(downsample, then blocks)")
        seq = [(f"stages.{s}.blocks.{i}", b) for i, b in enumerate(st.blocks)] + seq
        if not isinstance(st.downsample, nn.Identity):
            return [(f"stages.{s}.downsample", st.downsample)] + seq
    return seq


def _input_check(m: nn.Module, first_attn: nn.Module) -> Callable[[Tensor], None]:
    stride = getattr(m.stem, "stride", None)

    def check(images: Tensor) -> None:
        if stride is None:
            return
        want = tuple(int(r) * int(stride) for r in first_attn.resolution)
        if tuple(images.shape[-2:]) != want:
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but this LeViT (attention biases for a "
                             f"{tuple(first_attn.resolution)} grid, stem stride {stride}) expects {want}; preprocess "
                             "with the model's own transform (vitdecomp.load_model(...).transform)")
    return check


def levit_plan(m: nn.Module) -> SpatialPlan:
    """The plan of a timm ``Levit`` / ``LevitDistilled`` with its mean-pooled readout (module docstring)."""
    from timm.models.levit import AttentionDownsample, LevitDownsample
    from timm.models.levit import Attention

    if m.global_pool != "avg":
        raise UnsupportedModuleError(f"Levit global_pool={m.global_pool!r}: only the mean-pooled readout "
                                     "(global_pool='avg', every timm LeViT) is decomposed")
    seq = _decomposed_blocks(m)
    if not seq:
        raise UnsupportedModuleError("stages: a Levit without blocks has no decomposable branch")
    blocks, units = [], []
    for j, (path, blk) in enumerate(seq):
        rule = rule_for("block", path, blk, "is not timm's levit.LevitBlock / LevitDownsample")(path, blk)
        blocks.append((j, path, blk))
        for br in rule.parts():
            if br.kind == "attn":
                units.append(Unit("attn", br.path, "attn", j, 0, _attn_hooks(br), br.gain,
                                  br.attn.num_heads, br.attn.head_dim))
            else:
                units.append(Unit("branch", br.path, br.kind, j, 0, _branch_hooks(br), br.gain))
    last = blocks[-1][2]

    def embed_hook(module, store):
        if isinstance(module, LevitDownsample):   # the stream is replaced: nothing before it is additive
            def zero(_, __, out):
                store["embed"] = torch.zeros_like(_mean(out, _compute_dtype(out)))[:, None]
            return [module.attn_downsample.register_forward_hook(zero)]
        return [module.register_forward_pre_hook(
            lambda _, a: store.__setitem__("embed", _mean(a[0], _compute_dtype(a[0]))[:, None]))]

    def hooks(store):
        return [last.register_forward_hook(
            lambda _, __, out: store.__setitem__("final", _mean(out, _compute_dtype(out))[:, None]))]

    def finalize(store, convention, first_level) -> ReadoutMaps:
        total = store["final"][:, 0]
        return ReadoutMaps({0: None}, lambda level, P: P[:, :, 0], torch.zeros_like(total), total, pooled=True)

    attns = [mod for mod in m.modules() if isinstance(mod, (Attention, AttentionDownsample))]
    last_attn = [mod for mod in last.modules() if isinstance(mod, (Attention, AttentionDownsample))][0]

    def grids(hw):
        r = tuple(last_attn.resolution)
        if isinstance(last_attn, AttentionDownsample):
            r = tuple((x - 1) // last_attn.stride + 1 for x in r)
        return {0: r}

    return SpatialPlan(
        family="timm-levit", root=m, blocks=blocks, units=units,
        readout=lambda x: m.forward_head(m.forward_features(x), pre_logits=True),
        check_input=_input_check(m, attns[0]), embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks,
        finalize=finalize, grids=grids, num_prefix_tokens=0, static=Pooling("avg"))


def _attn_hooks(br: Branch):
    def hooks(store, key, ctx):
        return br.attn.hooks(ctx, lambda r: store.__setitem__(key, r))
    return hooks


def _branch_hooks(br: Branch):
    def hooks(store, key, ctx):
        def on_out(_, __, out):
            with ctx.exact():
                store[key] = _mean(out, ctx.dtype)[:, None]
        return [br.module.register_forward_hook(on_out)]
    return hooks


_register()

__all__ = ["LevitAttentionRule", "folded", "levit_plan"]
