"""torch.library custom ops of attnfast: autograd, a PyTorch path and Triton dispatch."""
from .residual_gate import residual_gate

__all__ = ["residual_gate"]
