"""Attention-Gated-Networks' ``GridAttentionBlock2D`` (ozan-oktay/Attention-Gated-Networks
``models/layers/grid_attention_layer.py``, ``_GridAttentionBlockND`` with dimension 2) and attnfast's reference
-> ``attnfast.nn.attention_gate.GridAttentionBlock2D``.

Layout: ``theta`` (k x k conv, stride k, unpadded), ``phi`` (1x1 conv of g), ``psi`` (1x1 conv to one channel),
``W`` (the output transform: conv + BatchNorm, run as it is); attributes ``mode`` ('concatenation',
'concatenation_sigmoid' or 'concatenation_softmax'; other modes are reported, not replaced),
``sub_sample_factor`` (= theta's stride) and ``upsample_mode`` ('bilinear'). The original's ``forward`` may
dispatch through ``self.operation_function`` (the bound ``_<mode>`` method, as AGN's code does); spec checks it
names the method of ``mode``, and the probe checks its maths.
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.attention_gate import GridAttentionBlock2D as Fused
from ...reference.attention_gate import AGN_MODES
from ...reference.attention_gate import GridAttentionBlock2D as Reference
from ..family import Candidate, Family, NotSwappable, Spec, has_modules, randn, require_conv1x1, require_plain_conv
from ..report import NO_OP


class AgnGrid(Family):
    name = "agn_grid"
    title = "Attention-Gated-Networks GridAttentionBlock2D"
    fused = Fused
    reference = Reference
    fused_runs = frozenset({"W"})  # theta/phi/psi: their tensors are read; W runs as it is
    reads = frozenset({"mode", "sub_sample_factor", "sub_sample_kernel_size", "upsample_mode", "dimension",
                       "in_channels", "gating_channels", "inter_channels", "operation_function"})

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "theta", "phi", "psi", "W") and hasattr(m, "mode")

    def spec(self, m: nn.Module) -> Spec:
        mode = m.mode
        if mode not in AGN_MODES:
            raise NotSwappable(f"mode {mode!r} has no fused op (fused: {', '.join(AGN_MODES)})", status=NO_OP)
        if getattr(m, "dimension", 2) != 2 or getattr(m, "upsample_mode", "bilinear") != "bilinear":
            raise NotSwappable(f"dimension {getattr(m, 'dimension', None)!r} / upsample_mode "
                               f"{getattr(m, 'upsample_mode', None)!r}: the fused gate is 2-D and bilinear")
        op = getattr(m, "operation_function", None)
        if op is not None and (getattr(op, "__self__", None) is not m or op.__name__ != f"_{mode}"):
            raise NotSwappable(f"operation_function is {op!r}, not the block's own _{mode}")
        theta = m.theta
        require_plain_conv(theta, "theta")
        if type(theta) is not nn.Conv2d:
            raise NotSwappable(f"theta is {type(theta).__name__}, not an nn.Conv2d")
        k = theta.kernel_size[0]
        if (theta.kernel_size != (k, k) or theta.stride != (k, k) or theta.padding != (0, 0)
                or theta.dilation != (1, 1) or theta.groups != 1 or theta.padding_mode != "zeros"):
            raise NotSwappable(f"theta is not a k x k, stride-k, unpadded convolution (kernel {theta.kernel_size}, "
                               f"stride {theta.stride}, padding {theta.padding})")
        sf = getattr(m, "sub_sample_factor", (k, k))
        if (tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)) != (k, k):
            raise NotSwappable(f"sub_sample_factor {sf!r} differs from theta's stride {k}")
        fi = theta.out_channels
        phi = require_conv1x1(m.phi, "phi", bias=True, out_channels=fi)
        psi = require_conv1x1(m.psi, "psi", bias=None, out_channels=1)
        if psi.in_channels != fi:
            raise NotSwappable(f"psi takes {psi.in_channels} channels; theta gives {fi}")
        if type(m.W) is not nn.Sequential:
            raise NotSwappable(f"W is {type(m.W).__name__}, not a Sequential")
        if set(m._modules) != {"theta", "phi", "psi", "W"}:
            raise NotSwappable(f"children {sorted(m._modules)} differ from theta, phi, psi, W")
        c, cg = theta.in_channels, phi.in_channels

        def inputs(gen, dtype, device):  # theta's grid 3 x 4 (x has a remainder row), g 2 x 2: resized
            return (randn(gen, dtype, device, 2, c, 3 * k + (k > 1), 4 * k),
                    randn(gen, dtype, device, 2, cg, 2, 2))

        return Spec((c, cg, fi), [Candidate({"mode": mode, "sub_sample_factor": (k, k)})], inputs)
