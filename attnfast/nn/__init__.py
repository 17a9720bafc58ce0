"""Thin drop-in modules over the fused ops (same constructor and parameter names as the references).

One attention per file: ``grid_attention.GridAttention``, ``self_attention.SelfAttention2d``,
``residual_attention.ResidualAttentionModule``, ``cbam.CBAM`` / ``cbam.LightCBAM``,
``attention_pool.LinearAttentionBlock`` / ``GlobalContextPool`` / ``GlobalContext``,
``attention_gate.AttentionBlock`` (MONAI) / ``attention_gate.GridAttentionBlock2D`` (Attention-Gated-Networks).
"""
from .residual_attention import ResidualAttentionModule

__all__ = ["ResidualAttentionModule", "GridAttention", "SelfAttention2d", "CBAM", "LightCBAM",
           "LinearAttentionBlock", "GlobalContextPool", "GlobalContext", "AttentionBlock", "GridAttentionBlock2D"]


def __getattr__(name):
    if name == "GridAttention":
        from .grid_attention import GridAttention
        return GridAttention
    if name == "SelfAttention2d":
        from .self_attention import SelfAttention2d
        return SelfAttention2d
    if name in ("CBAM", "LightCBAM"):
        from . import cbam
        return getattr(cbam, name)
    if name in ("LinearAttentionBlock", "GlobalContextPool", "GlobalContext"):
        from . import attention_pool
        return getattr(attention_pool, name)
    if name in ("AttentionBlock", "GridAttentionBlock2D"):
        from . import attention_gate
        return getattr(attention_gate, name)
    raise AttributeError(f"module 'attnfast.nn' has no attribute {name!r}")
