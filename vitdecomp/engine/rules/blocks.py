"""Block rules: where a residual block's branches are and which channel gains follow them.

A pre-norm block computes ``x + s1(attn(n1(x)))`` then ``x + s2(mlp(n2(x)))``. The norms belong to
the branches (their statistics are frozen by taking the branch outputs as they are); ``s1``/``s2``
are channel gains (LayerScale, DropPath/Dropout in eval) that the engine applies to every part of
the branch, heads and tokens included.

A block rule returns a :class:`BlockRule`. Its :meth:`BlockRule.parts` lists the block's residual
branches (:class:`Branch`): by default its attention then its MLP; blocks with more branches
(MaxViT: MBConv, window attention + MLP, grid attention + MLP) or whose attention runs on
partitioned positions (Swin windows) list them in ``branches``, each saying how to put what it
captured back into image coordinates. Static readouts (CLS, mean) and per-position readouts
(attention pool, Swin, MaxViT) use the same block rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .registry import register_rule, rule_for


@dataclass
class Branch:
    """One residual branch of a block: its output is added to the residual stream (times ``gain``).

    ``kind``: ``"attn"`` (split into heads by the attention rule ``attn``), ``"mlp"`` or ``"conv"``
    (one component). ``module``: the attention module, or the module whose *output* is the branch
    output (before ``gain``). ``to_positions(t, shape)``: what the branch captured (an attention's
    out-projection input, an MLP output) → ``[B, N, C]`` in image coordinates (row-major over the
    stream's grid, prefix tokens first); ``shape`` is the shape of ``shape_from``'s input (the block
    input, for undoing window partitions and shifts); None when ``t`` is ``[B, N, C]`` already.
    ``merge``: a merge rule (role ``merge``) applied to the stream by this branch's block before
    the branch output is added (MaxViT's stride-2 shortcut): the branch lives at the next level.
    """

    kind: str
    path: str
    module: nn.Module
    gain: Optional[Tensor] = None
    attn: object = None  # an AttentionRule for kind "attn"
    to_positions: Optional[Callable[[Tensor, Optional[tuple]], Tensor]] = None
    shape_from: Optional[nn.Module] = None
    merge: object = None


@dataclass
class BlockRule:
    """Resolved structure of one block: attention rule, MLP module and the branch gains.

    ``branches``: every residual branch in order, when the block is not a plain attention + MLP
    block (see :meth:`parts`); ``downsample``: a merge rule the block applies to its input stream
    (the block's branches then live at the next level).
    """

    path: str
    attn_path: str
    attn: object  # an AttentionRule
    mlp_path: str
    mlp: nn.Module
    gain1: Optional[Tensor]
    gain2: Optional[Tensor]
    branches: list = field(default_factory=list)
    downsample: object = None

    def parts(self) -> list[Branch]:
        """The block's residual branches: ``branches``, or its attention then its MLP."""
        if self.branches:
            return list(self.branches)
        return [Branch("attn", self.attn_path, getattr(self.attn, "module", None), self.gain1, attn=self.attn),
                Branch("mlp", self.mlp_path, self.mlp, self.gain2)]


def _gain(path: str, *modules: tuple[str, nn.Module]) -> Optional[Tensor]:
    gain = None
    for name, mod in modules:
        g = rule_for("scale", f"{path}.{name}", mod)(mod)
        if g is not None:
            gain = g if gain is None else gain * g
    return gain


def _make(path: str, module: nn.Module, attn: str, mlp: str, scales1, scales2,
          extra1: Optional[Tensor] = None, extra2: Optional[Tensor] = None) -> BlockRule:
    """``extra1``/``extra2``: branch gains held as plain parameters (EVA's ``gamma_1``/``gamma_2``)."""
    attn_path, mlp_path = f"{path}.{attn}", f"{path}.{mlp}"
    attn_mod = getattr(module, attn)
    attn_rule = rule_for("attention", attn_path, attn_mod)(attn_path, attn_mod)
    g1 = _gain(path, *((n, getattr(module, n)) for n in scales1))
    g2 = _gain(path, *((n, getattr(module, n)) for n in scales2))
    if extra1 is not None:
        g1 = extra1 if g1 is None else g1 * extra1
    if extra2 is not None:
        g2 = extra2 if g2 is None else g2 * extra2
    return BlockRule(path, attn_path, attn_rule, mlp_path, getattr(module, mlp), g1, g2)


def _register() -> None:
    from timm.models.vision_transformer import Block
    from open_clip.transformer import ResidualAttentionBlock

    @register_rule("block", Block)
    def timm_block(path: str, module: nn.Module) -> BlockRule:
        return _make(path, module, "attn", "mlp", ("ls1", "drop_path1"), ("ls2", "drop_path2"))

    @register_rule("block", ResidualAttentionBlock)
    def open_clip_block(path: str, module: nn.Module) -> BlockRule:
        if hasattr(module, "ln_1_kv"):
            raise UnsupportedModuleError(f"{path}: cross-attention blocks are not decomposed")
        return _make(path, module, "attn", "mlp", ("ls_1",), ("ls_2",))

    from timm.models.eva import EvaBlock

    @register_rule("block", EvaBlock)
    def eva_block(path: str, module: nn.Module) -> BlockRule:
        """Pre-norm EVA block: ``x + dp1(γ1 ⊙ attn(n1(x)))``, ``x + dp2(γ2 ⊙ mlp(n2(x)))`` (SwiGLU MLPs
        and MLP sub-norms are inside the ``mlp`` branch)."""
        return _make(path, module, "attn", "mlp", ("drop_path1",), ("drop_path2",), module.gamma_1, module.gamma_2)


_register()
