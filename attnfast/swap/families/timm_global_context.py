"""timm's ``GlobalContext`` (GCNet, ``attn_layer='gc'``/``'gca'``): a softmax over space pools a context vector
(``conv_attn``), which ``mlp_scale`` (gated by ``gate``) and/or ``mlp_add`` turn into a per-channel scale/shift.
Recognised; no fused op yet.
"""
from __future__ import annotations

import torch.nn as nn

from ..family import Family, is_instance_of_loaded
from ..report import NO_OP


class TimmGlobalContext(Family):
    name = "timm_global_context"
    title = "timm GlobalContext (GCNet)"
    status = NO_OP

    def matches(self, m: nn.Module) -> bool:
        if is_instance_of_loaded(m, "timm.layers.global_context", "GlobalContext"):
            return True
        keys = set(m._modules)
        return "conv_attn" in keys and ("mlp_scale" in keys or "mlp_add" in keys)

    def explain(self, m: nn.Module) -> str:
        return "needs a fused global-context op (softmax-pooled context, then a channel MLP)"
