"""Thin drop-in modules over the fused ops (same constructor and parameter names as the references).

One attention per file: ``grid_attention.GridAttention``, ``self_attention.SelfAttention2d``,
``residual_attention.ResidualAttentionModule``, ``cbam.CBAM`` / ``cbam.LightCBAM``.
"""
from .residual_attention import ResidualAttentionModule

__all__ = ["ResidualAttentionModule", "GridAttention", "SelfAttention2d", "CBAM", "LightCBAM"]


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
    raise AttributeError(f"module 'attnfast.nn' has no attribute {name!r}")
