"""attnfast: fused Triton attention modules for CNN image classifiers.

- ``attnfast.reference``: plain-PyTorch modules faithful to the seeds (ground truth).
- ``attnfast.ops``: torch.library custom ops (autograd, PyTorch path, Triton dispatch).
- ``attnfast.kernels``: the Triton kernels (installed from the top-level ``kernels/`` folder).
- ``attnfast.nn``: drop-in modules over the ops; ``attnfast.models``: AttnVGG, RAN.
"""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402,F401
from .nn import ResidualAttentionModule  # noqa: E402,F401
