"""Thin drop-in modules over the fused ops (same constructor and parameter names as the references)."""
from .residual_attention import ResidualAttentionModule

__all__ = ["ResidualAttentionModule"]
