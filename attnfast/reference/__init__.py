"""Plain-PyTorch reference modules, faithful to the seeds (the ground truth for every fused op)."""
from .attention_pool import GlobalContext, GlobalContextPool, LinearAttentionBlock, attention_pool_reference
from .attention_gate import AttentionBlock, GridAttentionBlock2D
from .cbam import CBAM, LightCBAM
from .grid_attention import GridAttention
from .residual_attention import ResidualAttentionModule, ResidualUnit, residual_gate_reference
from .self_attention import SelfAttention

__all__ = ["GridAttention", "SelfAttention", "CBAM", "LightCBAM", "ResidualAttentionModule", "ResidualUnit",
           "residual_gate_reference", "LinearAttentionBlock", "GlobalContext", "GlobalContextPool",
           "attention_pool_reference", "AttentionBlock", "GridAttentionBlock2D"]
