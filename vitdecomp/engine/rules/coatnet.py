"""The rest of timm's ``MaxxVit`` family on MaxViT's per-position plan (:func:`~.families.maxvit_plan`):
CoAtNet (``coatnet_*``, ``coatnet_rmlp_*``), CoAtNeXt, MaxxViT / MaxxViT v2 (``maxxvit_*``,
``maxxvitv2_*``) and the parallel MaxViT (``maxvit_tiny_pm_256``).

Every block of these models is a sum of residual branches on an NCHW stream; a stage's first block
may first apply a stride-2 shortcut ``Downsample2d`` (average pooling + 1×1 conv: the ``merge`` rule
of :mod:`.families`, a level change of the per-position plan). Rules registered here:

- ``block`` ``MbConvBlock`` (a CoAtNet ``C`` block): ``shortcut(x) + drop_path(mbconv(x))`` → one
  component ``<block>.conv`` (pre-norm BatchNorm, activations, depthwise conv and squeeze-excitation
  frozen inside it, like MaxViT's MBConv branch);
- ``block``/``branch`` ``ConvNeXtBlock`` (CoAtNeXt ``C`` blocks, MaxxViT's conv part):
  ``shortcut(x) + drop_path(ls ⊙ mlp(norm(conv_dw(x))))`` → one component ``<block>.conv`` (top-level)
  or ``<block>.conv`` as the module path (inside a ``MaxxVitBlock``); LayerScale is the branch gain;
- ``block`` ``TransformerBlock2d`` (a CoAtNet ``T`` block): ``shortcut(x) + ls1 ⊙ attn(norm1(x))``
  then ``x + ls2 ⊙ mlp(norm2(x))`` → heads ``<block>.attn.head.<h>`` and ``<block>.mlp``;
- ``attention`` ``Attention2d`` (NCHW global attention with a relative position bias, 1×1-conv qkv and
  out-projection): the bias (``RelPosBias`` or ``RelPosMlp``) only changes the attention
  probabilities, which are frozen; heads meet only in the 1×1 out-projection, so each head is read
  from the out-projection's input at every position (:class:`LinearView` gives the engine the
  conv as the per-position matrix it is);
- ``block`` ``ParallelMaxxVitBlock``: its conv blocks (``<block>.conv.<i>``), then
  ``ParallelPartitionAttention``: window and grid attention side by side, each writing one half of the
  channels (``concat``) → heads ``<block>.attn.attn_block.head.<h>`` / ``<block>.attn.attn_grid.head.<h>``
  (each head's out-projection zero-padded to the full width) and ``<block>.attn.mlp``;
- ``scale`` ``LayerScale2d``: a per-channel gain.

Tokens (per-position terms) are, as for MaxViT, each head's direct effect at every position of its
stage in image coordinates: the head's output at that query position (through the frozen attention
probabilities of the real forward pass) carried to the readout; they sum to the head.

Refused with :class:`~vitdecomp.errors.UnsupportedModuleError`: max-pooling shortcuts
(``coatnet_rmlp_1_rw_224``: a max pool is not linear), NCHW partition attention (``use_nchw_attn``),
a 1×1-conv shortcut without pooling, and conv modules repeated inside one parallel block.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .attention import AttentionRule
from .blocks import BlockRule, Branch, _gain
from .families import _nchw_seq, _nhwc_seq, mbconv_branch
from .registry import register_rule, rule_for


class LinearView:
    """What the engine reads of an out-projection that is not an ``nn.Linear``: ``weight [D, C]`` and ``bias
    [D]`` (or None) of the per-position linear map of a 1×1 ``Conv2d`` or ``Linear`` ``module``, optionally
    placed in channels ``[start, start + out)`` of a ``width``-channel stream (zero rows elsewhere: a
    projection whose output is concatenated with another one's). Read from the module at every use,
    so a later ``model.to(dtype)`` is seen."""

    def __init__(self, module: nn.Module, width: Optional[int] = None, start: int = 0):
        self.module, self.width, self.start = module, width, start

    def _place(self, t: Tensor) -> Tensor:
        if self.width is None:
            return t
        out = t.new_zeros(self.width, *t.shape[1:])
        out[self.start:self.start + t.shape[0]] = t
        return out

    @property
    def weight(self) -> Tensor:
        return self._place(self.module.weight.flatten(1))

    @property
    def bias(self) -> Optional[Tensor]:
        b = self.module.bias
        return None if b is None else self._place(b)


def _conv1x1(path: str, conv: nn.Module) -> nn.Conv2d:
    if not (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and tuple(conv.stride) == (1, 1) and conv.padding in ((0, 0), "valid")):
        raise UnsupportedModuleError(f"{path}: {type(conv).__qualname__} is not a 1×1 Conv2d out-projection "
                                     "(groups 1, stride 1, no padding); its heads cannot be split per position")
    return conv


class Attention2dRule(AttentionRule):
    """timm ``Attention2d`` (CoAtNet, NCHW): heads meet only in the 1×1-conv ``proj``; the heads are read
    from its input ``[B, H·dh, h, w]`` (head-major channels, as timm's ``view``/``reshape`` lays them out),
    so the fused kernel and the relative position bias are left as they are."""

    def __init__(self, path: str, module: nn.Module):
        super().__init__(path, module)
        self.num_heads, self.head_dim = int(module.num_heads), int(module.dim_head)
        proj = self.out_proj()
        if proj.in_channels != self.num_heads * self.head_dim:
            raise UnsupportedModuleError(f"{path}.proj: {proj.in_channels} input channels != heads × head_dim "
                                         f"({self.num_heads} × {self.head_dim})")

    def out_proj(self) -> nn.Module:
        return _conv1x1(f"{self.path}.proj", self.module.proj)

    def out_linear(self) -> LinearView:
        return LinearView(self.out_proj())


class ConcatSliceAttention(AttentionRule):
    """An attention rule whose out-projection writes channels ``[start, start + out)`` of a ``width``-channel
    stream (``ParallelPartitionAttention``'s ``concat``): hooks and heads of ``rule``, the projection
    zero-padded to the full width."""

    def __init__(self, rule: AttentionRule, start: int, width: int):
        super().__init__(rule.path, rule.module)
        if getattr(rule, "post", None) is not None:
            raise UnsupportedModuleError(f"{rule.path}: a post-norm attention inside a channel concat is not supported")
        self.rule, self.start, self.width = rule, start, width
        self.num_heads, self.head_dim = rule.num_heads, rule.head_dim

    def out_proj(self) -> nn.Module:
        return self.rule.out_proj()

    def position_hooks(self, ctx, sink) -> list:
        return self.rule.position_hooks(ctx, sink)

    def out_linear(self) -> LinearView:
        return LinearView(self.out_proj(), self.width, self.start)


def _shortcut(path: str, sc: nn.Module):
    """The ``merge`` rule of a block's shortcut, or None for the identity."""
    if isinstance(sc, nn.Identity):
        return None
    return rule_for("merge", path, sc, "is not a Downsample2d (average pooling + 1×1 conv) shortcut")(path, sc)


def convnext_branch(path: str, blk: nn.Module, name: Optional[str] = None) -> Branch:
    """timm maxxvit ``ConvNeXtBlock`` as one ``conv`` branch named ``name`` (default ``path``): the MLP output
    (depthwise conv and norm frozen inside it) times the gain ``ls`` (and DropPath); its shortcut
    ``Downsample2d`` is the ``merge``."""
    nchw = blk.use_conv_mlp
    return Branch("conv", name or path, blk.mlp, _gain(path, ("ls", blk.ls), ("drop_path", blk.drop_path)),
                  to_positions=(lambda t, _: _nchw_seq(t)) if nchw else (lambda t, _: _nhwc_seq(t)),
                  merge=_shortcut(f"{path}.shortcut", blk.shortcut))


def _single(path: str, br: Branch) -> BlockRule:
    return BlockRule(path, "", None, "", None, None, None, branches=[br], downsample=br.merge)


def mbconv_block(path: str, blk: nn.Module) -> BlockRule:
    """A top-level ``MbConvBlock`` (CoAtNet): one component ``<path>.conv``."""
    return _single(path, mbconv_branch(path, blk, name=f"{path}.conv"))


def convnext_block(path: str, blk: nn.Module) -> BlockRule:
    """A top-level ``ConvNeXtBlock`` (CoAtNeXt): one component ``<path>.conv``."""
    return _single(path, convnext_branch(path, blk, name=f"{path}.conv"))


def transformer_block2d(path: str, blk: nn.Module) -> BlockRule:
    """timm ``TransformerBlock2d``: ``shortcut(x) + dp1(ls1(attn(norm1(x))))`` then ``x + dp2(ls2(mlp(norm2(x))))``
    on NCHW maps; a stride-2 block pools inside ``norm1`` (part of the attention branch) and in its
    ``Downsample2d`` shortcut (the merge)."""
    attn_path = f"{path}.attn"
    a = rule_for("attention", attn_path, blk.attn, "is not timm's Attention2d")(attn_path, blk.attn)
    g1 = _gain(path, ("ls1", blk.ls1), ("drop_path1", blk.drop_path1))
    g2 = _gain(path, ("ls2", blk.ls2), ("drop_path2", blk.drop_path2))

    def nchw(t, _):
        return _nchw_seq(t)
    branches = [Branch("attn", attn_path, blk.attn, g1, attn=a, to_positions=nchw),
                Branch("mlp", f"{path}.mlp", blk.mlp, g2, to_positions=nchw)]
    return BlockRule(path, attn_path, a, f"{path}.mlp", blk.mlp, g1, g2, branches=branches,
                     downsample=_shortcut(f"{path}.shortcut", blk.shortcut))


def parallel_partition_block(path: str, pa: nn.Module) -> BlockRule:
    """timm ``ParallelPartitionAttention``: ``x + ls1(concat(window_attn, grid_attn)(norm1(x)))`` then
    ``x + ls2(mlp(norm2(x)))``, channels-last. Each attention's heads fill their half of the channels."""
    from timm.models.maxxvit import grid_reverse, window_reverse

    g1 = _gain(path, ("ls1", pa.ls1), ("drop_path1", pa.drop_path1))
    g2 = _gain(path, ("ls2", pa.ls2), ("drop_path2", pa.drop_path2))
    parts = [("attn_block", window_reverse), ("attn_grid", grid_reverse)]
    outs = []
    for name, _ in parts:
        proj = getattr(getattr(pa, name), "proj", None)
        if not isinstance(proj, nn.Linear):
            raise UnsupportedModuleError(f"{path}.{name}.proj: {type(proj).__qualname__} is not an nn.Linear")
        outs.append(proj.out_features)
    width, start, branches, first = sum(outs), 0, [], None
    for (name, fn), out in zip(parts, outs):
        apath = f"{path}.{name}"
        mod = getattr(pa, name)
        a = ConcatSliceAttention(rule_for("attention", apath, mod, "is not timm's AttentionCl")(apath, mod), start, width)
        start += out

        def reverse(t, shape, fn=fn):
            return _nhwc_seq(fn(t, pa.partition_size, shape[1:3]))
        branches.append(Branch("attn", apath, mod, g1, attn=a, to_positions=reverse, shape_from=pa))
        first = first or a
    branches.append(Branch("mlp", f"{path}.mlp", pa.mlp, g2, to_positions=lambda t, _: _nhwc_seq(t)))
    return BlockRule(path, first.path, first, f"{path}.mlp", pa.mlp, g1, g2, branches=branches)


def parallel_maxxvit_block(path: str, blk: nn.Module) -> BlockRule:
    """timm ``ParallelMaxxVitBlock``: its conv blocks (``branch`` rules; only the first may downsample), then a
    ``ParallelPartitionAttention`` (``block`` rule) on the channels-last stream."""
    seq = isinstance(blk.conv, nn.Sequential)
    convs = list(blk.conv) if seq else [blk.conv]
    if len({id(c) for c in convs}) != len(convs):
        raise UnsupportedModuleError(f"{path}.conv: one conv block module is applied more than once (timm's "
                                     "ParallelMaxxVitBlock with num_conv > 2 repeats it); its calls cannot be told "
                                     "apart by hooks, so it is not decomposed")
    branches, merge = [], None
    for i, c in enumerate(convs):
        cpath = f"{path}.conv.{i}" if seq else f"{path}.conv"
        br = rule_for("branch", cpath, c, "is not an MbConvBlock or ConvNeXtBlock")(cpath, c)
        if br.merge is not None:
            if i > 0:
                raise UnsupportedModuleError(f"{cpath}.shortcut: a downsampling shortcut after the first conv block "
                                             f"of {path} is not supported")
            merge = br.merge
        branches.append(br)
    apath = f"{path}.attn"
    r = rule_for("block", apath, blk.attn, "is not timm's ParallelPartitionAttention")(apath, blk.attn)
    return BlockRule(path, r.attn_path, r.attn, r.mlp_path, r.mlp, r.gain1, r.gain2,
                     branches=branches + r.parts(), downsample=merge)


def _register() -> None:
    from timm.layers import LayerScale2d
    from timm.models.maxxvit import (Attention2d, ConvNeXtBlock, MbConvBlock, ParallelMaxxVitBlock,
                                     ParallelPartitionAttention, TransformerBlock2d)

    register_rule("scale", LayerScale2d)(lambda m: m.gamma)
    register_rule("attention", Attention2d)(Attention2dRule)
    register_rule("branch", ConvNeXtBlock)(convnext_branch)
    register_rule("block", MbConvBlock)(mbconv_block)
    register_rule("block", ConvNeXtBlock)(convnext_block)
    register_rule("block", TransformerBlock2d)(transformer_block2d)
    register_rule("block", ParallelPartitionAttention)(parallel_partition_block)
    register_rule("block", ParallelMaxxVitBlock)(parallel_maxxvit_block)


_register()
