"""Block rules: where a residual block's branches are and which channel gains follow them.

A pre-norm block computes ``x + s1(attn(n1(x)))`` then ``x + s2(mlp(n2(x)))``. The norms belong to
the branches (their statistics are frozen by taking the branch outputs as they are); ``s1``/``s2``
are channel gains (LayerScale, DropPath/Dropout in eval) that the engine applies to every part of
the branch, heads and tokens included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .registry import register_rule, rule_for


@dataclass
class BlockRule:
    """Resolved structure of one block: attention rule, MLP module and the branch gains."""

    path: str
    attn_path: str
    attn: object  # an AttentionRule
    mlp_path: str
    mlp: nn.Module
    gain1: Optional[Tensor]
    gain2: Optional[Tensor]


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
