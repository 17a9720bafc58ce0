"""torch.library custom ops of attnfast: autograd, a PyTorch path and Triton dispatch (one template for
every op: docs/adding-an-op.md).

- ``grid_attention(l, g, w_l, w_g, phi_w, phi_b, up_factor, normalize_attn) -> (a, pooled)``
  (``return_logits=True``: ``(c, pooled)``, the logits differentiable)
- ``self_attention(q, k, v, x=None, gamma=None, ...)``: exact SAGAN attention, O(N) memory
- ``residual_gate(mask_logits, trunk)``: ``(1 + sigmoid(m)) * t``
- ``attention_gate(x, g, ...)``, ``attention_gate_logits``, ``gate``: the Attention U-Net gate (MONAI, AGN)
- ``cbam(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, bn_w, bn_b, running_mean, running_var, ...)``: fused CBAM
- ``attention_pool(l, weight, bias=None, g=None, normalize=..., reduce=...)``: linear-score attention pooling
"""
from .attention_pool import attention_pool
from .attention_gate import attention_gate, attention_gate_logits, gate
from .cbam import cbam
from .grid_attention import grid_attention
from .residual_gate import residual_gate
from .self_attention import self_attention

__all__ = ["attention_gate", "attention_gate_logits", "attention_pool", "cbam", "gate", "grid_attention",
           "residual_gate", "self_attention"]
