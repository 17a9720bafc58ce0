"""``return_logits``: the logits are a real output of ``attnfast::grid_attention``, their gradient goes through
the op's own backward (against the float64 reference), and a loss that does not use them costs nothing extra
(no PyTorch pass on the Triton path)."""
import sys

import pytest
import torch

from attnfast.nn.grid_attention import GridAttention
from attnfast.reference.grid_attention import GridAttention as Reference

G = sys.modules["attnfast.ops.grid_attention"]


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
@pytest.mark.parametrize("normalize", [True, False], ids=["softmax", "sigmoid"])
def test_logits_and_their_gradient_match_the_reference(request, backend, normalize, device):
    request.getfixturevalue(backend)
    ref = Reference(8, 6, 16, 2, normalize, return_logits=True).double().to(device)
    fused = GridAttention(8, 6, 16, 2, normalize, return_logits=True).to(device)
    fused.load_state_dict(ref.state_dict())
    l = torch.randn(2, 8, 6, 4, dtype=torch.float64, device=device)
    g = torch.randn(2, 6, 3, 2, dtype=torch.float64, device=device)
    w_c = torch.randn(2, 1, 6, 4, dtype=torch.float64, device=device)
    outs = []
    for m, dt in ((ref, torch.float64), (fused, torch.float32)):
        li, gi = l.to(dt).detach().requires_grad_(), g.to(dt).detach().requires_grad_()
        c, pooled = m(li, gi)
        ((c.double() * w_c).sum() + pooled.double().square().sum()).backward()
        outs.append([c.double(), pooled.double(), li.grad.double(), gi.grad.double()]
                    + [p.grad.double() for p in m.parameters()])
    for got, want in zip(*reversed(outs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("return_logits", [False, True])
def test_no_extra_pass_without_a_logits_gradient(triton_backend, monkeypatch, return_logits):
    calls = []
    orig = G._torch_backward
    monkeypatch.setattr(G, "_torch_backward", lambda *a: calls.append(1) or orig(*a))
    m = GridAttention(8, 6, 16, 2, return_logits=return_logits)
    l, g = torch.randn(2, 8, 6, 4, requires_grad=True), torch.randn(2, 6, 3, 2, requires_grad=True)
    _, pooled = m(l, g)
    pooled.sum().backward()
    assert calls == [], "the kernels' backward took a PyTorch pass for logits that carry no gradient"
    if return_logits:
        c, pooled = m(l, g)
        (c.sum() + pooled.sum()).backward()
        assert calls == [1]
