"""timm's ``GlobalContext`` (GCNet, ``attn_layer='gc'``/``'gca'``) and copies of its layout ->
``attnfast.nn.GlobalContext``: the softmax-pooled context (``conv_attn``) comes from the fused
``attnfast::attention_pool`` op; ``mlp_scale`` (gated by ``gate``) and ``mlp_add`` are the layer's own modules,
called as they are (any activation, norm or gate).

Layout: children ``conv_attn`` (1x1 ``nn.Conv2d`` to one channel, bias or not), ``mlp_scale`` and/or ``mlp_add``,
``gate``. ``use_attn=False`` (no ``conv_attn``: a plain mean) has nothing to fuse. ``reset_parameters``
(initialisation) is not carried over (noted). unswap turns a directly built fused GlobalContext into
``attnfast.reference.GlobalContext`` (timm's layout; its constructor needs timm).
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.attention_pool import GlobalContext as Fused
from ...reference.attention_pool import GlobalContext as Reference
from ..family import (Candidate, Family, NotSwappable, Spec, is_instance_of_loaded, randn, require_conv1x1)
from ..report import OUT_OF_SCOPE


class TimmGlobalContext(Family):
    name = "timm_global_context"
    title = "timm GlobalContext (GCNet)"
    fused = Fused
    reference = Reference  # unswap of a directly built fused GlobalContext: timm's layout in plain PyTorch
    fused_runs = frozenset({"mlp_add", "mlp_scale", "gate"})  # conv_attn's weights are read, not called
    reads = frozenset({"conv_attn", "mlp_add", "mlp_scale", "gate"})  # the fused module reads them itself (timm
    #                                                                 keeps an absent one as a plain None attribute)
    tolerated_methods = frozenset({"reset_parameters"})

    def matches(self, m: nn.Module) -> bool:
        if is_instance_of_loaded(m, "timm.layers.global_context", "GlobalContext"):
            return True
        keys = set(m._modules)
        return "conv_attn" in keys and ("mlp_scale" in keys or "mlp_add" in keys)

    def spec(self, m: nn.Module) -> Spec:
        conv = m._modules.get("conv_attn")
        if conv is None:
            raise NotSwappable("no conv_attn (use_attn=False): its context is a plain mean, nothing to fuse",
                               status=OUT_OF_SCOPE)
        conv = require_conv1x1(conv, "conv_attn", bias=None, out_channels=1)
        for name in ("mlp_add", "mlp_scale", "gate"):
            child = m._modules.get(name, None)
            if name in m._modules and child is not None and not isinstance(child, nn.Module):
                raise NotSwappable(f"{name} is not a module")
        if m._modules.get("mlp_scale") is not None and not isinstance(m._modules.get("gate"), nn.Module):
            raise NotSwappable("mlp_scale without a gate module")
        c = conv.in_channels
        mlps = {n: m._modules.get(n) for n in ("mlp_add", "mlp_scale")}
        # what the reference's constructor needs to hold these children (unswap; swap builds from the children)
        kwargs = {"fuse_add": mlps["mlp_add"] is not None, "fuse_scale": mlps["mlp_scale"] is not None}
        fc1 = getattr(mlps["mlp_scale"] or mlps["mlp_add"], "fc1", None)
        if isinstance(fc1, nn.Conv2d):
            kwargs["rd_channels"] = fc1.out_channels
        if isinstance(m, Fused):
            try:
                import timm.layers.mlp  # noqa: F401 - the reference's constructor builds timm's ConvMlp
            except ImportError:
                raise NotSwappable("attnfast.reference.GlobalContext is built from timm's ConvMlp; timm is not "
                                   "installed") from None

        def inputs(gen, dtype, device):
            return (randn(gen, dtype, device, 2, c, 5, 6),)

        return Spec((c,), [Candidate(kwargs)], inputs)

    def build(self, m: nn.Module, spec: Spec, candidate: Candidate) -> nn.Module:
        return Fused.from_modules(m.conv_attn, m._modules.get("mlp_add"), m._modules.get("mlp_scale"),
                                  m._modules.get("gate"), getattr(m, "init_last_zero", False))
