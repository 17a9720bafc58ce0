"""The Residual Attention Network's popular PyTorch port (tengshaofeng/ResidualAttentionNetwork-pytorch
``attention_module.py``, ``AttentionModule_stage1/2/3`` and their ``_cifar`` variants): residual blocks, a soft
mask branch of max pools, skip blocks and bilinear upsampling ending in ``softmax6_blocks`` (..., Sigmoid), then
``(1 + mask) * trunk`` and ``last_blocks``. Only that last step matches a fused op (``residual_gate``): reported,
left alone (attnfast's own ``ResidualAttentionModule`` and ``attnfast.models.ResidualAttentionNet`` fuse it).
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, has_modules
from ..report import PARTIAL


class RanPort(Family):
    name = "ran_port"
    title = "Residual Attention Network, PyTorch port (AttentionModule_stage*)"
    status = PARTIAL

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "first_residual_blocks", "trunk_branches", "last_blocks") and any(
            k.startswith("softmax") for k in m._modules)

    def explain(self, m: nn.Module) -> str:
        return ("the fused residual_gate op computes only its last step, (1 + sigmoid mask) * trunk, and swap "
                "does not rewrite a layer's forward: it stays eager (attnfast.models.ResidualAttentionNet "
                "fuses that gate)")
