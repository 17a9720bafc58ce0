"""CBAM as its authors wrote it (Park et al., Jongchan/attention-module ``MODELS/cbam.py``): ``ChannelGate``
(``mlp``: Flatten, Linear with bias, ReLU, Linear; ``pool_types`` avg and max) then ``SpatialGate`` (``compress``:
ChannelPool [max, mean]; ``spatial``: BasicConv = bias-free odd k x k conv to one channel + affine BatchNorm2d,
``relu=False``) -> ``attnfast.nn.cbam_authors.AuthorsCBAM``: the fused cbam op reading the user's own modules
through a weight-layout view and a channel-order flip (see that module). ``no_spatial=True`` (a channel gate
alone) is out of scope.
"""
from __future__ import annotations

import torch.nn as nn

from ...nn.cbam_authors import TIE_NOTE, AuthorsCBAM
from ..family import Candidate, Family, NotSwappable, Spec, has_modules, randn, require_plain_conv, require_tensors
from ..report import OUT_OF_SCOPE


class CbamAuthors(Family):
    name = "cbam_authors"
    title = "CBAM, the authors' code (ChannelGate + SpatialGate)"
    fused = AuthorsCBAM
    fused_runs = frozenset()  # the op reads the gates' weights; ChannelGate runs only if no_spatial is set later
    reads = frozenset({"no_spatial"})  # honoured by the fused module

    def matches(self, m: nn.Module) -> bool:
        return has_modules(m, "ChannelGate") and (has_modules(m, "SpatialGate") or hasattr(m, "no_spatial"))

    def spec(self, m: nn.Module) -> Spec:
        if getattr(m, "no_spatial", False) or not has_modules(m, "SpatialGate"):
            raise NotSwappable("no_spatial=True leaves a channel-only gate (SE-style), which swap does not fuse",
                               status=OUT_OF_SCOPE)
        cg, sg = m.ChannelGate, m.SpatialGate
        mlp = getattr(cg, "mlp", None)
        if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and isinstance(mlp[1], nn.Linear)
                and type(mlp[2]) is nn.ReLU and isinstance(mlp[3], nn.Linear)
                and not any(True for _ in mlp[0].parameters())):
            raise NotSwappable("ChannelGate.mlp is not Sequential(Flatten, Linear, ReLU, Linear)")
        fc1, fc2 = mlp[1], mlp[3]
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            raise NotSwappable("ChannelGate.mlp's layers are Linear subclasses; the op reads plain Linear weights")
        c, r = fc1.in_features, fc1.out_features
        if (fc2.in_features, fc2.out_features) != (r, c):
            raise NotSwappable(f"ChannelGate.mlp maps {c}->{r} then {fc2.in_features}->{fc2.out_features}")
        pools = getattr(cg, "pool_types", None)
        if not isinstance(pools, (list, tuple)) or sorted(pools) != ["avg", "max"]:
            raise NotSwappable(f"ChannelGate.pool_types is {pools!r}; the fused CBAM pools avg and max")
        spatial = getattr(sg, "spatial", None)
        conv, bn = getattr(spatial, "conv", None), getattr(spatial, "bn", None)
        if not isinstance(conv, nn.Conv2d) or not has_modules(sg, "compress"):
            raise NotSwappable("SpatialGate has no compress module and spatial.conv convolution")
        require_plain_conv(conv, "SpatialGate.spatial.conv")
        k = conv.kernel_size[0]
        if (type(conv) is not nn.Conv2d or conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (1, 1)
                or conv.padding != (k // 2, k // 2) or conv.dilation != (1, 1) or conv.groups != 1
                or conv.bias is not None or (conv.in_channels, conv.out_channels) != (2, 1)):
            raise NotSwappable(f"SpatialGate.spatial.conv is not an odd k x k, stride-1, 'same'-padded, bias-free "
                               f"2 -> 1 conv (kernel {conv.kernel_size}, padding {conv.padding})")
        if type(bn) is not nn.BatchNorm2d or bn.num_features != 1 or not bn.affine:
            raise NotSwappable(f"SpatialGate.spatial.bn is {type(bn).__name__}, not an affine BatchNorm2d(1)")
        if getattr(spatial, "relu", None) is not None:
            raise NotSwappable("SpatialGate.spatial has a ReLU (relu=True); the fused CBAM's spatial gate has none")
        expected = {f"ChannelGate.mlp.{i}.{p}" for i, lin in ((1, fc1), (3, fc2)) for p in ("weight", "bias")
                    if getattr(lin, p) is not None}
        expected |= {f"SpatialGate.spatial.{n}" for n, _ in spatial.named_parameters()}
        expected |= {f"SpatialGate.spatial.{n}" for n, _ in spatial.named_buffers()}
        require_tensors(m, expected)

        def inputs(gen, dtype, device):
            return (randn(gen, dtype, device, 2, c, 6, 5),)

        return Spec((), [Candidate({"max_first": True}), Candidate({"max_first": False})], inputs, notes=(TIE_NOTE,))

    def build(self, m: nn.Module, spec: Spec, candidate: Candidate) -> nn.Module:
        return AuthorsCBAM(m.ChannelGate, m.SpatialGate, **candidate.kwargs)
