"""A new family is one Family subclass in the registry: shown with timm's CbamModule and attnfast's fused CBAM.

The family is registered only inside this test (monkeypatched ``FAMILIES``, ahead of the built-in ``cbam``): it
checks that the registry, the probe and the adoption of another library's children (timm's ``ChannelAttn`` /
``SpatialAttn`` -> attnfast's own) work for a module with BatchNorm buffers.
"""
import copy

import pytest
import torch

from attnfast.swap import families as registry
from attnfast.swap import swap, unswap
from attnfast.swap.family import Candidate, Family, Spec

cbam_layers = pytest.importorskip("timm.layers.cbam")
fused_cbam = pytest.importorskip("attnfast.nn.cbam")


class TimmCbam(Family):
    name = "test_timm_cbam"
    title = "timm CbamModule (test family)"
    fused = fused_cbam.CBAM
    fused_runs = frozenset()

    def matches(self, m):
        return isinstance(m, cbam_layers.CbamModule)

    def spec(self, m):
        fc1, conv = m.channel.fc1, m.spatial.conv.conv
        kwargs = {"rd_channels": fc1.out_channels, "spatial_kernel_size": conv.kernel_size[0],
                  "mlp_bias": fc1.bias is not None}

        def inputs(gen, dtype, device):
            return (torch.randn((2, fc1.in_channels, 6, 5), generator=gen, dtype=dtype, device=device),)

        return Spec((fc1.in_channels,), [Candidate(kwargs)], inputs)


def test_one_family_class_adds_a_family(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", (TimmCbam(),) + registry.FAMILIES)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), cbam_layers.CbamModule(32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.train()
    oracle = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.1)
    keys, ids = list(model.state_dict()), [id(t) for t in list(model.parameters()) + list(model.buffers())]
    result = swap(model)
    assert [(r.name, r.new_type, r.family) for r in result] == [("1", "attnfast.nn.cbam.CBAM", "test_timm_cbam")]
    assert list(model.state_dict()) == keys
    assert [id(t) for t in list(model.parameters()) + list(model.buffers())] == ids
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        out, ref = model(x), oracle(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        (out * out).sum().backward()
        (ref * ref).sum().backward()
        for (n, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)
        opt.step()
        opt_oracle.step()
        opt.zero_grad()
        opt_oracle.zero_grad()
    for k, v in oracle.state_dict().items():  # BatchNorm statistics and num_batches_tracked included
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)
    original = result[0]
    assert [r.name for r in unswap(model)] == ["1"] and isinstance(model[1], cbam_layers.CbamModule)
    assert original.old_type.endswith("CbamModule")
