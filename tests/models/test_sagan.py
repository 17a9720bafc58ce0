"""sagan_resnet: the SAGAN self-attention classifier (fused and reference attention)."""
import pytest
import torch

from attnfast.models import create_model
from attnfast.models.sagan import SAGANResNet, build
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.reference.self_attention import SelfAttention


def test_factory_and_shapes():
    net = create_model("sagan_resnet", 7, width=8)
    assert isinstance(net, SAGANResNet) and isinstance(net.attn.layer, SelfAttention2d)
    assert net(torch.randn(2, 3, 16, 24)).shape == (2, 7)
    ref = create_model("sagan_resnet", 7, attention="reference", width=8)
    assert isinstance(ref.attn.layer, SelfAttention)


def test_default_attends_at_64x64():
    net = build(10)  # width 32: attention on the full 64x64 map of a 64x64 image
    seen = {}
    def hook(module, inputs, output):
        seen["shape"] = inputs[0].shape

    net.attn.layer.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.randn(1, 3, 64, 64))
    assert seen["shape"] == (1, 32, 64, 64)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_fused_equals_reference(request, backend, device):
    request.getfixturevalue(backend)
    fused = build(5, width=8, attn_gamma=0.5).eval().to(device)
    ref = build(5, attention="reference", width=8).eval().to(device)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 16, 16, device=device)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_trains_on_cpu(torch_backend):
    torch.manual_seed(0)
    net = build(3, width=8, attn_gamma=0.1, pool=True)
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net.attn.layer.gamma.grad is not None and net.attn.layer.gamma.grad.abs().item() > 0
    assert losses[-1] < losses[0]


def test_bad_input():
    net = build(3, width=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.randn(1, 3, 12, 16))
    with pytest.raises(ValueError, match="3 channels"):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="attention must be"):
        build(3, attention="nope")
    with pytest.raises(ValueError, match="no self-attention options"):
        build(3, attention="reference", pool=True)
