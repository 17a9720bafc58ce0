"""What every swap family test checks: a swapped model trains like an unswapped deep copy (the oracle)."""
import copy
import warnings

import torch

from attnfast.swap import SwapWarning, swap


def _flat(out):
    """The tensors of a (nested) output, Nones kept as None."""
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


def _loss(out, seed=1):
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in _flat(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total = total + (t * torch.randn(t.shape, generator=gen)).sum()
    return total


def _same_structure(a, b, dropped=()):
    """Same nesting and shapes; positions in ``dropped`` are (tensor in a, None in b)."""
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), (type(a), type(b))
        for i, (u, v) in enumerate(zip(a, b)):
            if i in dropped:
                assert isinstance(u, torch.Tensor) and v is None
            else:
                _same_structure(u, v)
    else:
        assert isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and a.shape == b.shape


def close(new, ref, msg=None, rel=3e-4, group=0.0):
    """Equal up to float32 rounding: |new - ref| <= rel * max(max|ref|, group / 100) elementwise (plus 1e-3
    relative). ``group``: the largest magnitude among related tensors (all gradients of a model), for tensors
    whose exact value is 0 (SAGAN's key bias gradient: the softmax is shift invariant)."""
    atol = rel * max(ref.detach().abs().max().item(), group / 100) + 1e-7
    torch.testing.assert_close(new, ref, atol=atol, rtol=1e-3, msg=msg)


def _largest(model) -> float:
    return max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)


def _without(out, dropped):
    return tuple(o for i, o in enumerate(out) if i not in dropped) if dropped else out


def check_swap_trains_like_oracle(model, inputs, expected, *, dropped=(), steps=2, swapper=swap, target=None):
    """swap ``model`` (optimizer built first) and compare it to an unswapped deep copy through ``steps`` steps:
    outputs, input gradients, every parameter's gradient (by name), and the state (parameters after the
    optimizer steps, buffers: BatchNorm statistics, spectral norm's vectors) afterwards. ``expected``: the
    replacements as (name, new class name)."""
    target = model if target is None else target  # what swap gets (a DDP/compiled wrapper) vs what trains
    oracle = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_oracle = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=0.9)
    ids = [id(p) for p in model.parameters()]
    keys = list(model.state_dict().keys())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)  # nothing here may be skipped
        result = swapper(target)
    assert [(r.name, type_tail(r.new_type)) for r in result] == expected
    assert result.skipped == []
    assert [id(p) for p in model.parameters()] == ids, "the swapped model must keep the Parameter objects"
    assert list(model.state_dict().keys()) == keys
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for _ in range(steps):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        xs_oracle = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out, out_oracle = model(*xs), oracle(*xs_oracle)
        _same_structure(out_oracle, out, dropped)
        for u, v in zip(_flat(_without(out_oracle, dropped)), _flat(_without(out, dropped))):
            close(v, u)
        _loss(_without(out, dropped)).backward()
        _loss(_without(out_oracle, dropped)).backward()
        for i, (x, x_oracle) in enumerate(zip(xs, xs_oracle)):
            if x_oracle.grad is not None or x.grad is not None:
                close(x.grad, x_oracle.grad, msg=f"gradient of input {i}")
        grads = {n: p.grad for n, p in model.named_parameters()}
        for n, p in oracle.named_parameters():
            assert (p.grad is None) == (grads[n] is None), n
            if p.grad is not None:
                close(grads[n], p.grad, msg=f"gradient of {n}", group=_largest(oracle))
        opt.step()
        opt_oracle.step()
        opt.zero_grad()
        opt_oracle.zero_grad()
    state = model.state_dict()
    # a parameter whose exact gradient is 0 (SAGAN's key bias) moves by rounding noise: scale by the model's largest
    largest = max(v.abs().max().item() for v in oracle.state_dict().values() if v.is_floating_point() and v.numel())
    for k, v in oracle.state_dict().items():
        if v.is_floating_point():
            close(state[k], v, msg=f"{k} after the optimizer steps", group=largest)
        else:
            assert torch.equal(state[k], v), k
    return result


def type_tail(name: str) -> str:
    return name.rsplit(".", 1)[-1]
