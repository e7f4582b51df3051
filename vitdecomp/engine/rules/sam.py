"""SAM ViT (timm ``VisionTransformerSAM``, ``samvit_*``): windowed and global attention blocks on an NHWC
stream, then the neck, then mean pooling. A per-position readout (:mod:`.spatial`) with one level.

- Block (``vision_transformer_sam.Block``): ``x + dp1(ls1(attn(windows(n1(x)))))`` then
  ``x + dp2(ls2(mlp(n2(x))))``. A windowed block pads ``n1(x)`` to a multiple of the window and
  partitions it (timm's ``window_partition``); a global block (``window_size == 0``) attends over the
  whole grid. Heads are read from the out-projection's input (each head's attention-weighted values
  exactly as the model's kernel computed them: decomposed relative position terms, rotary embeddings
  and q/k norms only change the attention probabilities) and put back in image coordinates with
  timm's own ``window_unpartition`` (padding cropped). Per-position ("token") terms are the direct
  effects at each position of the grid.
- Neck (``neck_chans``): ``Y1 = W1 ⋆ X`` (1×1 conv), ``LN1`` per position, ``Y2 = W3 ⋆ ·`` (3×3 conv, zero
  padding 1), ``LN2`` per position, then the head's mean over the ``N`` positions. With every ``σ``
  frozen at its real value the readout is linear in the last stream ``X [N, D]``, with one weight group
  per conv tap ``t`` (an offset ``Δ_t`` of the 3×3 kernel)::

      z_lin(u) = Σ_t  L2( W3_t · L1( W1 · P[t] ) ),      P[t] = Σ_q ω[t, q] u[q]
      ω[t, q]  = 1 / (N · σ1[q] · σ2[q − Δ_t])      (0 when q − Δ_t is outside the grid)

  ``L1``/``L2``: the norms' ``γ ⊙ C(·)`` (``centered``) or ``γ ⊙ ·`` (``uniform``). Offsets: ``β1`` (and
  under ``uniform`` ``−γ1 μ1/σ1``) per position carried through the 3×3 conv with its zero padding,
  ``β2`` (``−γ2 μ2/σ2``), and the conv biases if a build has them, go to the offset term.
- Neck ``LayerNorm2d`` alone (``neck_chans=None``, ``samvit_base_patch16_224``): a per-position final norm
  before mean pooling, ``ω[q] = 1/(N σ[q])``. No neck (``head_hidden_size``): mean pooling, then the
  ``NormMlpClassifierHead``'s norm and ``pre_logits.fc`` as the frozen readout chain; the readout is the
  input of its ``tanh`` (as for MaxViT's ``tf`` heads).

Refused with :class:`~vitdecomp.errors.UnsupportedModuleError`: a head pooling other than ``avg``, a neck
of another structure (strided / dilated / grouped / non-"same" convs), blocks of other types. Rotary
models (``use_rope``) need the built image size (the global rotary table is built for that grid);
relative position tables are interpolated by timm at other sizes, which changes only probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputError, UnsupportedModuleError
from .affine import NormSpec, PostOp, layernorm_stats
from .attention import AttentionRule
from .blocks import Branch, BlockRule, _gain
from .families import _linear, _nchw_seq, _nhwc_seq, _store_input, _store_output, block_units, head_readout
from .models import _patch_check, _patch_grid
from .registry import register_rule, rule_for
from .spatial import ReadoutMaps, SpatialPlan, norm_linear, norm_offset


# ------------------------------------------------------------------------------------------- attention
class SamAttentionRule(AttentionRule):
    """SAM ``Attention``: fused qkv, optional q/k norms, decomposed relative position terms or rotary
    embeddings (probabilities only), ``proj`` Linear. Heads meet only in ``proj``; used inside SAM's
    per-position readout (the out-projection's input, see the module docstring)."""

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        self.num_heads, self.head_dim = int(module.num_heads), int(module.head_dim)
        self.out_proj()


# ---------------------------------------------------------------------------------------------- block
def sam_block(path: str, blk: nn.Module) -> BlockRule:
    """SAM ``Block``: windowed (``window_size > 0``, padded partition) or global attention, then the MLP on
    the flattened grid (row-major, already image coordinates)."""
    from timm.models.vision_transformer_sam import window_unpartition

    attn_path = f"{path}.attn"
    a = rule_for("attention", attn_path, blk.attn, "is not SAM's Attention")(attn_path, blk.attn)
    ws = int(blk.window_size)

    def reverse(t: Tensor, shape: tuple) -> Tensor:
        """Out-projection input ``[B·nW, ws·ws, C]`` (or ``[B, H·W, C]``) → ``[B, H·W, C]`` row-major."""
        B, H, W, _ = shape
        if ws <= 0:
            return t.reshape(B, H * W, t.shape[-1])
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        return _nhwc_seq(window_unpartition(t.reshape(-1, ws, ws, t.shape[-1]), ws, (H, W), (Hp, Wp)))

    g1 = _gain(path, ("ls1", blk.ls1), ("drop_path1", blk.drop_path1))
    g2 = _gain(path, ("ls2", blk.ls2), ("drop_path2", blk.drop_path2))
    branches = [Branch("attn", attn_path, blk.attn, g1, attn=a, to_positions=reverse, shape_from=blk),
                Branch("mlp", f"{path}.mlp", blk.mlp, g2)]
    return BlockRule(path, attn_path, a, f"{path}.mlp", blk.mlp, g1, g2, branches=branches)


# ----------------------------------------------------------------------------------------------- neck
def _ln2d(path: str, mod: nn.Module) -> NormSpec:
    """timm ``LayerNorm2d`` (LayerNorm over the channels of an NCHW map) as a :class:`NormSpec`."""
    from timm.layers import LayerNorm2d

    if type(mod) is not LayerNorm2d:
        raise UnsupportedModuleError(f"{path}: {type(mod).__qualname__} is not timm's LayerNorm2d (SAM's neck norm); "
                                     "only that norm is decomposed here")
    return NormSpec("layernorm", mod.weight, mod.bias, float(mod.eps))


def _same_conv(path: str, conv: nn.Module, kernel: Optional[int] = None) -> int:
    """Check a stride-1, undilated, ungrouped, zero-padded "same" ``Conv2d`` with a square odd kernel; its size."""
    if type(conv) is not nn.Conv2d:
        raise UnsupportedModuleError(f"{path}: {type(conv).__qualname__} is not an nn.Conv2d (SAM's neck conv)")
    k = conv.kernel_size
    ok = (k[0] == k[1] and k[0] % 2 == 1 and (kernel is None or k[0] == kernel) and conv.stride == (1, 1)
          and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
          and conv.padding == (k[0] // 2, k[0] // 2))
    if not ok:
        raise UnsupportedModuleError(
            f"{path}: Conv2d(kernel={k}, stride={conv.stride}, padding={conv.padding}, dilation={conv.dilation}, "
            f"groups={conv.groups}, padding_mode={conv.padding_mode!r}) is not decomposed; SAM's neck needs "
            f"stride-1 'same' convolutions{'' if kernel is None else f' with a {kernel}×{kernel} kernel'}")
    return k[0]


def _neck(neck: nn.Module) -> tuple[str, list]:
    """``("identity", [])``, ``("norm", [spec])`` or ``("conv", [conv1, ln1, conv3, ln3, k])``."""
    from timm.layers import LayerNorm2d

    if isinstance(neck, nn.Identity):
        return "identity", []
    if type(neck) is LayerNorm2d:
        return "norm", [_ln2d("neck", neck)]
    if type(neck) is nn.Sequential and len(neck) == 4:
        _same_conv("neck.0", neck[0], kernel=1)
        k = _same_conv("neck.2", neck[2])
        if neck[0].out_channels != neck[2].in_channels:
            raise UnsupportedModuleError("neck: the two convs' channels do not chain")
        return "conv", [neck[0], _ln2d("neck.1", neck[1]), neck[2], _ln2d("neck.3", neck[3]), k]
    kinds = [type(c).__qualname__ for c in neck] if isinstance(neck, nn.Sequential) else type(neck).__qualname__
    raise UnsupportedModuleError(f"neck: {kinds} is not SAM's neck (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d), "
                                 "a LayerNorm2d or Identity; vitdecomp does not decompose other necks")


def neck_weights(inv1: Tensor, inv2: Tensor, k: int) -> Tensor:
    """Per-tap position weights of the conv neck: ``inv1``/``inv2 [B, h, w]`` (``1/σ1``, ``1/σ2``) →
    ``ω [B, k·k, h·w]`` with ``ω[t, q] = inv1[q] · inv2[q − Δ_t] / N`` (zero outside the grid), tap
    ``t = ky·k + kx`` of the kernel, ``Δ_t = (ky − k//2, kx − k//2)``."""
    B, h, w = inv2.shape
    p = k // 2
    inv2p = F.pad(inv2, (p, p, p, p))
    out = inv2.new_empty(B, k * k, h * w)
    for ky in range(k):
        for kx in range(k):
            dy, dx = ky - p, kx - p
            out[:, ky * k + kx] = (inv2p[:, p - dy:p - dy + h, p - dx:p - dx + w] * inv1).reshape(B, -1)
    return out / (h * w)


# ---------------------------------------------------------------------------------------------- model
def sam_plan(m: nn.Module) -> SpatialPlan:
    """timm ``VisionTransformerSAM``: see the module docstring."""
    from timm.layers import ClassifierHead, NormMlpClassifierHead

    head = m.head
    gp = getattr(head, "global_pool", None)
    if type(head) not in (ClassifierHead, NormMlpClassifierHead):
        raise UnsupportedModuleError(f"head: {type(head).__qualname__} is not timm's ClassifierHead or "
                                     "NormMlpClassifierHead; SAM's readout is decomposed through those only")
    if getattr(gp, "pool_type", None) != "avg":
        raise UnsupportedModuleError(f"head.global_pool: pool_type={getattr(gp, 'pool_type', None)!r}; only mean "
                                     "pooling ('avg') is a linear readout of SAM's neck output (build it with "
                                     "global_pool='avg')")
    if getattr(head, "use_conv", False):
        raise UnsupportedModuleError("head: a 1×1-conv classifier head is not decomposed for SAM")
    rule_for("scale", "head.drop", head.drop)
    post, fc = [], None
    if type(head) is NormMlpClassifierHead:
        if not isinstance(head.norm, nn.Identity):
            post.append(PostOp("head.norm", spec=_ln2d("head.norm", head.norm)))
        fc = getattr(head.pre_logits, "fc", None)
        if fc is not None:
            post.append(PostOp("head.pre_logits.fc", weight=_linear("head.pre_logits.fc", fc).weight, bias=fc.bias))
        elif not isinstance(head.pre_logits, nn.Identity):
            raise UnsupportedModuleError(f"head.pre_logits: {type(head.pre_logits).__qualname__} is not supported")
    kind, parts = _neck(m.neck)

    blocks, units = [], []
    for i, blk in enumerate(m.blocks):
        path = f"blocks.{i}"
        rule = rule_for("block", path, blk, "is not timm's SAM Block")(path, blk)
        blocks.append((i, path, blk))
        units += block_units(rule, i, 0)

    readout = head_readout(m, fc)                  # the input of pre_logits' tanh when there is one

    def hooks(store):
        hs = [gp.register_forward_hook(_store_output(store, "head_in", lambda t: t.flatten(1))),
              gp.register_forward_pre_hook(_store_input(store, "grid", lambda t: tuple(t.shape[2:])))]
        if kind == "norm":
            hs.append(m.neck.register_forward_pre_hook(_store_input(store, "ln_in", _nchw_seq)))
        elif kind == "conv":
            hs.append(m.neck[1].register_forward_pre_hook(_store_input(store, "ln1_in", _nchw_seq)))
            hs.append(m.neck[3].register_forward_pre_hook(_store_input(store, "ln2_in", _nchw_seq)))
        return hs

    def finalize(store, convention, first_level) -> ReadoutMaps:
        total = store["head_in"]
        dt = torch.float64 if total.dtype == torch.float64 else torch.float32
        total = total.to(dt)
        B, dev = total.shape[0], total.device
        h, w = store["grid"]
        n = h * w
        if kind == "identity":
            return ReadoutMaps({0: torch.full((B, 1, n), 1.0 / n, dtype=dt, device=dev)}, lambda lvl, P: P[:, :, 0],
                               torch.zeros_like(total), total, post=post)
        if kind == "norm":
            spec = parts[0]
            y = store["ln_in"].to(dt)
            mu, sig = layernorm_stats(y, spec)
            return ReadoutMaps({0: (1.0 / (n * sig[..., 0]))[:, None]},
                               lambda lvl, P: norm_linear(spec, P[:, :, 0], convention),
                               norm_offset(spec, mu / sig, convention).mean(1), total, post=post)
        conv1, ln1, conv3, ln2, k = parts
        y1, y2 = store["ln1_in"].to(dt), store["ln2_in"].to(dt)                   # [B, N, C] row-major
        mu1, s1 = layernorm_stats(y1, ln1)
        mu2, s2 = layernorm_stats(y2, ln2)
        weights = neck_weights((1.0 / s1[..., 0]).view(B, h, w), (1.0 / s2[..., 0]).view(B, h, w), k)
        w1 = conv1.weight.to(dt)[:, :, 0, 0]                                       # [C, D]
        w3 = conv3.weight.to(dt)                                                   # [C, C, k, k]
        w3t = w3.permute(2, 3, 0, 1).reshape(k * k, w3.shape[0], w3.shape[1])      # [G, C_out, C_in]

        def lin(lvl: int, P: Tensor) -> Tensor:                                    # P [B, K, G, D]
            y = norm_linear(ln1, P @ w1.T, convention)                             # [B, K, G, C]
            return norm_linear(ln2, torch.einsum("bkgc,gec->bke", y, w3t), convention)

        o1 = norm_offset(ln1, mu1 / s1, convention)                               # [B, N, C] per position
        if conv1.bias is not None:
            o1 = o1 + norm_linear(ln1, conv1.bias.to(dt), convention) / s1
        C = o1.shape[-1]
        o2 = F.conv2d(o1.transpose(1, 2).reshape(B, C, h, w), w3, None if conv3.bias is None else conv3.bias.to(dt),
                      padding=k // 2)
        o2 = _nchw_seq(o2)                                                         # [B, N, C]
        offset = (norm_linear(ln2, o2, convention) / s2 + norm_offset(ln2, mu2 / s2, convention)).mean(1)
        return ReadoutMaps({0: weights}, lin, offset, total, post=post)

    def embed_hook(module, store):
        return [module.register_forward_pre_hook(_store_input(store, "embed", _nhwc_seq))]

    pe = m.patch_embed
    grid = _patch_grid(pe)
    fixed = getattr(m, "rope_global", None) is not None and any(int(b.window_size) <= 0 for b in m.blocks)
    patch_ok = _patch_check(pe)

    def check(images: Tensor) -> None:
        patch_ok(images)
        if fixed and tuple(images.shape[-2:]) != tuple(pe.img_size):
            raise InputError(f"images are {tuple(images.shape[-2:])} pixels but this rotary SAM ViT expects "
                             f"{tuple(pe.img_size)} (its global rotary table is built for that grid; build it "
                             "with img_size=...)")

    return SpatialPlan(
        family="timm-sam", root=m, blocks=blocks, units=units, readout=readout, check_input=check,
        embed_hook=embed_hook, level_of_input=lambda b: 0, hooks=hooks, finalize=finalize,
        grids=lambda hw: {0: grid(hw)})


def _register() -> None:
    from timm.models import vision_transformer_sam as vs

    register_rule("model", vs.VisionTransformerSAM)(sam_plan)
    register_rule("block", vs.Block)(sam_block)
    register_rule("attention", vs.Attention)(SamAttentionRule)


_register()
