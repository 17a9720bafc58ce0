"""NaN and inf propagate through every attnfast op exactly as through eager PyTorch, forward and backward.

For each op (grid attention in both modes, SAGAN self-attention as the seed's layer and at op level, the
residual gate, CBAM and light CBAM in train and eval mode), one input or parameter at a time gets NaN,
+inf or -inf, in one element and in the whole tensor. The eager reference (attnfast.reference's module
or the seed's formula, in plain PyTorch autograd) and attnfast then run forward and backward with the same
finite upstream gradients, and every output, input gradient, parameter gradient (and updated BatchNorm
running statistic) must have the same non-finite pattern: NaN at the same positions, +inf and -inf at
the same positions. Where eager is finite, attnfast is finite.

Both paths: the PyTorch path and the Triton kernels (interpreted on a CPU, compiled on CUDA on a GPU
machine: the tests take the ``device`` fixture). fp32 throughout, plus fp16 cases, and results that overflow
the 16-bit range (far from the boundary, so rounding cannot decide it). Shapes are tiny (the interpreter).

Documented difference: attention gates resizing g (Attention-Gated-Networks) on the kernels with a non-finite
phi weight (attnfast.ops.attention_gate); the PyTorch path follows eager there too.

Not covered, by design: an fp16 *intermediate* that eager rounds to fp16 and overflows (a 1x1 conv output,
the scores q^T k, grad * t inside the gate's backward) while attnfast keeps it in fp32: there eager has
inf / NaN and attnfast the finite, correct value.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from attnfast.nn.attention_gate import AttentionBlock, GridAttentionBlock2D
from attnfast.nn.cbam import CBAM, LightCBAM
from attnfast.nn.grid_attention import GridAttention
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.ops import residual_gate, self_attention
from attnfast.reference import residual_gate_reference
from attnfast.reference.attention_gate import AttentionBlock as RefAttentionBlock
from attnfast.reference.attention_gate import GridAttentionBlock2D as RefGridAttentionBlock2D
from attnfast.reference.cbam import CBAM as RefCBAM
from attnfast.reference.cbam import LightCBAM as RefLightCBAM
from attnfast.reference.grid_attention import GridAttention as RefGridAttention
from attnfast.reference.self_attention import SelfAttention

BACKENDS = ["torch_backend", "triton_backend"]
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def matrix(cases, triton_cases):
    """pytest params (backend, *case): every case on the PyTorch path, ``triton_cases`` (a subset: the
    interpreter is slow) on the Triton kernels. The Triton subsets keep every injection that reaches a
    kernel differently: the inputs, and parameters whose non-finite values the kernels see (the rest is
    small-map torch code shared by both paths)."""
    def param(backend, case):
        case = case if isinstance(case, tuple) else (case,)
        return pytest.param(backend, *case, id="-".join([backend.split("_")[0], *map(str, case)]))
    return [param("torch_backend", c) for c in cases] + [param("triton_backend", c) for c in triton_cases]


# ----------------------------------------------------------------------------------------------
# harness
# ----------------------------------------------------------------------------------------------
class _Fn(nn.Module):
    """A parameter-free op as a module (its inputs are all injection targets)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _inject(t: torch.Tensor, value: float, where: str) -> torch.Tensor:
    t = t.detach().clone()
    if where == "all":
        t.fill_(value)
    else:
        t.view(-1)[(2 * t.numel()) // 3] = value
    return t


def _run(module, inputs: dict, upstream: list) -> dict:
    """Forward + backward; every output, input gradient, parameter gradient and floating buffer, by name."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    outs = module(*leaves.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = tuple(o for o in outs if o is not None)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, upstream)])
    res = {f"out[{i}]": o.detach() for i, o in enumerate(outs)}
    res.update({f"d{k}": v.grad for k, v in leaves.items()})
    res.update({f"d{n}": p.grad for n, p in module.named_parameters()})
    res.update({n: b for n, b in module.named_buffers() if b.is_floating_point()})
    return res


def _pattern(t: torch.Tensor):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def _mismatches(got: dict, want: dict) -> list:
    bad = []
    for name, w in want.items():
        g = got.get(name)
        if (g is None) != (w is None):
            bad.append(f"{name}: {'missing' if g is None else 'unexpected'}")
            continue
        if w is None:
            continue
        pg, pw = _pattern(g), _pattern(w)
        if not torch.equal(pg, pw):
            diff = (pg != pw).any(0)
            pos = diff.nonzero()[:3].tolist()
            kinds = ["nan", "+inf", "-inf"]
            bad.append(f"{name}: {int(diff.sum())}/{w.numel()} positions differ, e.g. {pos}: "
                       f"attnfast {[g[tuple(p)].item() for p in pos]} vs eager {[w[tuple(p)].item() for p in pos]} "
                       f"(eager has {[int(x.sum()) for x in pw]} {kinds}, attnfast {[int(x.sum()) for x in pg]})")
    return bad


def check_nonfinite(eager: nn.Module, fused: nn.Module, inputs: dict, upstream: list, target: str,
                    wheres=("one", "all"), values=VALUES) -> None:
    """Inject each value of ``values`` into ``target`` (an input name or a parameter/buffer name), run both
    modules, and assert identical non-finite patterns; one assertion listing every failing injection."""
    failures = []
    for vname, value in values.items():
        for where in wheres:
            e, f = copy.deepcopy(eager), copy.deepcopy(fused)
            ins = dict(inputs)
            if target in ins:
                ins[target] = _inject(ins[target], value, where)
            else:
                for m in (e, f):
                    t = m.get_parameter(target) if target in dict(m.named_parameters()) else m.get_buffer(target)
                    with torch.no_grad():
                        t.copy_(_inject(t, value, where))
            want = _run(e, ins, upstream)
            got = _run(f, ins, upstream)
            failures += [f"{target}={vname} ({where}): {m}" for m in _mismatches(got, want)]
    assert not failures, "\n".join(failures)


def _randn(*shape, device, scale=1.0):
    return torch.randn(*shape, device=device) * scale


def _copy_pair(ref: nn.Module, fused: nn.Module, device, dtype=torch.float32):
    fused.load_state_dict(ref.state_dict())
    return ref.to(device=device, dtype=dtype), fused.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# grid attention
# ----------------------------------------------------------------------------------------------
GRID_TARGETS = ["l", "g", "W_l.weight", "W_g.weight", "phi.weight", "phi.bias"]


def _grid(normalize, device, dtype=torch.float32):
    ref = RefGridAttention(4, 3, 8, 2, normalize_attn=normalize)
    eager, fused = _copy_pair(ref, GridAttention(4, 3, 8, 2, normalize_attn=normalize), device, dtype)
    inputs = {"l": _randn(2, 4, 4, 6, device=device).to(dtype), "g": _randn(2, 3, 2, 3, device=device).to(dtype)}
    upstream = [_randn(2, 1, 4, 6, device=device), _randn(2, 4, device=device)]
    return eager, fused, inputs, upstream


GRID_CASES = [(mode, t) for mode in ("softmax", "sigmoid") for t in GRID_TARGETS]


@pytest.mark.parametrize("backend, mode, target", matrix(
    GRID_CASES, [c for c in GRID_CASES if c[0] == "softmax" or c[1] in ("l", "g", "W_g.weight", "phi.weight")]))
def test_grid_attention(request, backend, mode, target, device):
    request.getfixturevalue(backend)
    # whole-tensor cases: the inputs and the bias (an all -inf logit row) on the kernels, everything here
    whole = backend == "torch_backend" or target in ("l", "g", "phi.bias")
    check_nonfinite(*_grid(mode == "softmax", device), target, wheres=("one", "all") if whole else ("one",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_attention_logits(request, backend, device):
    """``return_logits=True``: the logits c (the op's, and their recomputed gradient) as the reference's."""
    request.getfixturevalue(backend)
    ref = RefGridAttention(4, 3, 8, 2, return_logits=True)
    eager, fused = _copy_pair(ref, GridAttention(4, 3, 8, 2, return_logits=True), device)
    _, _, inputs, upstream = _grid(True, device)
    check_nonfinite(eager, fused, inputs, upstream, "l", wheres=("one",))


# ----------------------------------------------------------------------------------------------
# self-attention: the seed's layer (parameters through the 1x1 convs) and the op (q, k, v, x, gamma)
# ----------------------------------------------------------------------------------------------
SAGAN_TARGETS = ["x", "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                 "value_conv.weight", "value_conv.bias", "gamma"]


def _sagan(device):
    ref = SelfAttention(16, tuple_output=False)
    with torch.no_grad():
        ref.gamma.fill_(0.7)
    eager, fused = _copy_pair(ref, SelfAttention2d(16, tuple_output=False), device)
    return eager, fused, {"x": _randn(2, 16, 3, 3, device=device)}, [_randn(2, 16, 3, 3, device=device)]


@pytest.mark.parametrize("backend, target", matrix(SAGAN_TARGETS, ["x", "gamma"]))  # op level below: q, k, v
def test_sagan_layer(request, backend, target, device):
    request.getfixturevalue(backend)
    if target == "gamma":  # gamma = 0 (SAGAN's initial value) too: eager's dO = 0 * dout meets the infinities
        check_nonfinite(*_sagan(device), target, wheres=("one",), values=dict(VALUES, zero=0.0))
    else:
        check_nonfinite(*_sagan(device), target)


def _sa_eager(q, k, v, x, gamma):
    o = torch.bmm(v, torch.softmax(torch.bmm(q.transpose(1, 2), k), -1).transpose(1, 2))
    return gamma * o + x


def _sa_op(device):
    inputs = {"q": _randn(2, 3, 7, device=device), "k": _randn(2, 3, 5, device=device),
              "v": _randn(2, 4, 5, device=device), "x": _randn(2, 4, 7, device=device),
              "gamma": torch.tensor([0.6], device=device)}
    return _Fn(_sa_eager), _Fn(self_attention), inputs, [_randn(2, 4, 7, device=device)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["q", "k", "v", "x", "gamma"])
def test_self_attention_op(request, backend, target, device):
    request.getfixturevalue(backend)
    check_nonfinite(*_sa_op(device), target, wheres=("one",) if target == "gamma" else ("one", "all"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["k", "v"])
def test_self_attention_zero_gamma(request, backend, target, device):
    """gamma = 0 with infinite keys or values: eager's dO = 0 * dout is 0, and its products with the
    infinities NaN."""
    request.getfixturevalue(backend)
    eager, fused, inputs, upstream = _sa_op(device)
    inputs["gamma"] = torch.zeros(1, device=device)
    check_nonfinite(eager, fused, inputs, upstream, target)


# ----------------------------------------------------------------------------------------------
# residual gate
# ----------------------------------------------------------------------------------------------
def _gate(device, dtype=torch.float32):
    inputs = {"m": _randn(2, 3, 4, 5, device=device, scale=3).to(dtype),
              "t": _randn(2, 3, 4, 5, device=device).to(dtype)}
    return _Fn(residual_gate_reference), _Fn(residual_gate), inputs, [_randn(2, 3, 4, 5, device=device)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["m", "t"])
def test_residual_gate(request, backend, target, device):
    request.getfixturevalue(backend)
    check_nonfinite(*_gate(device), target)


# ----------------------------------------------------------------------------------------------
# attention gates: MONAI AttentionBlock (BatchNorms folded; train and eval), AGN GridAttentionBlock2D
# ----------------------------------------------------------------------------------------------
MONAI_TARGETS = ["g", "x", "W_g.0.conv.weight", "W_x.0.conv.bias", "W_x.1.weight", "psi.0.conv.weight",
                 "psi.1.bias", "W_x.1.running_var"]
AGN_TARGETS = ["x", "g", "theta.weight", "phi.weight", "phi.bias", "psi.weight", "psi.bias"]


def _gate_block(kind, train, device, dtype=torch.float32):
    if kind == "monai":
        ref, fused = RefAttentionBlock(2, 4, 6, 5), AttentionBlock(2, 4, 6, 5)
        inputs = {"g": _randn(2, 6, 4, 5, device=device), "x": _randn(2, 5, 4, 5, device=device)}
        upstream = [_randn(2, 5, 4, 5, device=device)]
    else:
        mode = "concatenation_softmax" if kind == "agn_softmax" else "concatenation"
        ref, fused = RefGridAttentionBlock2D(5, 6, 6, mode=mode), GridAttentionBlock2D(5, 6, 6, mode=mode)
        # g resized 2x to theta's grid: eager's CPU resize then weights its taps (some 0) like the kernels and
        # CUDA's (for other ratios it interpolates as a + t (b - a), whose NaN/inf differ from the taps' sum)
        inputs = {"x": _randn(2, 5, 8, 12, device=device), "g": _randn(2, 6, 2, 3, device=device)}
        upstream = [_randn(2, 5, 8, 12, device=device), _randn(2, 1, 8, 12, device=device)]
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    eager, fused = _copy_pair(ref, fused, device, dtype)
    eager.train(train)
    fused.train(train)
    return eager, fused, {k: v.to(dtype) for k, v in inputs.items()}, upstream


GATE_CASES = ([("monai-train", t) for t in MONAI_TARGETS if "running" not in t]  # train mode reads no running stat
              + [("monai-eval", t) for t in ("g", "W_g.0.conv.weight", "W_x.1.weight", "psi.0.conv.weight",
                                             "psi.1.bias", "W_x.1.running_var")]
              + [("agn-train", t) for t in AGN_TARGETS]
              + [("agn_softmax-train", t) for t in ("x", "phi.bias", "psi.weight", "psi.bias")])
GATE_TRITON = [("monai-train", "x"), ("monai-eval", "g"), ("monai-eval", "W_g.0.conv.weight"),
               ("monai-eval", "psi.0.conv.weight"), ("agn-train", "x"), ("agn-train", "g"),
               ("agn-train", "theta.weight"), ("agn-train", "phi.bias"), ("agn_softmax-train", "psi.weight")]
# not on the kernels: a non-finite phi.weight (they resize g before projecting it; see attnfast.ops.attention_gate)


@pytest.mark.parametrize("backend, variant, target", matrix(GATE_CASES, GATE_TRITON))
def test_attention_gate(request, backend, variant, target, device):
    request.getfixturevalue(backend)
    kind, mode = variant.split("-")
    whole = backend == "torch_backend" or target in ("x", "g")
    check_nonfinite(*_gate_block(kind, mode == "train", device), target, wheres=("one", "all") if whole else ("one",))


# ----------------------------------------------------------------------------------------------
# CBAM and light CBAM
# ----------------------------------------------------------------------------------------------
CBAM_TARGETS = ["x", "channel.fc1.weight", "channel.fc1.bias", "channel.fc2.weight", "channel.fc2.bias",
                "spatial.conv.conv.weight", "spatial.conv.bn.weight", "spatial.conv.bn.bias"]


def _cbam(light, train, device, dtype=torch.float32):
    kw = dict(rd_channels=3, spatial_kernel_size=3, mlp_bias=True)
    ref = (RefLightCBAM if light else RefCBAM)(8, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
        ref.spatial.conv.bn.running_mean.fill_(0.2)
        ref.spatial.conv.bn.running_var.fill_(1.5)
    eager, fused = _copy_pair(ref, (LightCBAM if light else CBAM)(8, **kw), device, dtype)
    eager.train(train)
    fused.train(train)
    return eager, fused, {"x": _randn(2, 8, 4, 5, device=device).to(dtype)}, [_randn(2, 8, 4, 5, device=device)]


CBAM_VARIANTS = ["cbam-train", "light-eval", "cbam-eval", "light-train"]
CBAM_CASES = [(v, t) for v in CBAM_VARIANTS for t in CBAM_TARGETS]
# the kernels: x, and parameters that make the gates or the max-pool gradient coefficients non-finite
CBAM_TRITON = [(v, t) for v in CBAM_VARIANTS[:2] for t in
               ("x", "channel.fc2.weight", "spatial.conv.conv.weight", "spatial.conv.bn.weight")]
CBAM_TRITON += [(v, "x") for v in CBAM_VARIANTS[2:]]


@pytest.mark.parametrize("backend, variant, target", matrix(CBAM_CASES, CBAM_TRITON))
def test_cbam(request, backend, variant, target, device):
    request.getfixturevalue(backend)
    light, mode = variant.split("-")
    whole = backend == "torch_backend" or target == "x"
    check_nonfinite(*_cbam(light == "light", mode == "train", device), target,
                    wheres=("one", "all") if whole else ("one",))


STATS = [(v, t) for v in ("cbam", "light") for t in ("spatial.conv.bn.running_mean", "spatial.conv.bn.running_var")]


@pytest.mark.parametrize("backend, variant, target", matrix(STATS, STATS[:2]))
def test_cbam_running_stats(request, backend, variant, target, device):
    request.getfixturevalue(backend)
    check_nonfinite(*_cbam(variant == "light", False, device), target, wheres=("one",))


# ----------------------------------------------------------------------------------------------
# -inf logits filling whole tiles: the flash-style running maximum starts at -inf
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_attention_minus_inf_leading_tiles(request, backend, device):
    """Every logit of the first pixel tiles (and splits) is -inf, the rest finite: eager softmax gives them
    probability 0 and stays finite elsewhere (pooled is NaN only in the channel holding the infinities,
    0 * inf). An online softmax that shifts by its running maximum while that is still -inf would compute
    exp(-inf + inf) = NaN there. 8 x 20 pixels: several tiles (64 fp32 pixels each) and splits."""
    request.getfixturevalue(backend)
    eager, fused, _, _ = _grid(True, device)
    with torch.no_grad():
        for m in (eager, fused):
            m.W_l.weight[:, 0].abs_()
            m.phi.weight.copy_(-m.phi.weight.abs())
    l = _randn(2, 4, 8, 20, device=device)
    l[:, 0, :7] = float("inf")  # the first 140 pixels: z = +inf in every channel, c = -inf
    inputs = {"l": l, "g": _randn(2, 3, 4, 10, device=device)}
    upstream = [_randn(2, 1, 8, 20, device=device), _randn(2, 4, device=device)]
    want = _run(copy.deepcopy(eager), inputs, upstream)
    assert want["out[0]"].isfinite().all() and (want["out[0]"][:, :, :7] == 0).all()
    assert want["out[1]"][:, 0].isnan().all() and want["out[1]"][:, 1:].isfinite().all()
    assert not _mismatches(_run(fused, inputs, upstream), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_attention_minus_inf_leading_key_blocks(request, backend, device):
    """The first 33 keys score -inf for every query (k = -inf in one channel where every q is positive), the
    other 7 finite: eager softmax gives those keys probability 0 and a finite output; dq is NaN in that
    channel (0 * -inf) and finite elsewhere. 40 keys: two key blocks of the kernels (32 fp32 keys each),
    the first all -inf, where a flash softmax shifting by its running maximum would compute exp(-inf + inf)."""
    request.getfixturevalue(backend)
    eager, fused, inputs, upstream = _sa_op(device)
    inputs["q"][:, 0].abs_().add_(0.1)
    inputs["k"] = _randn(2, 3, 40, device=device)
    inputs["k"][:, 0, :33] = float("-inf")
    inputs["v"] = _randn(2, 4, 40, device=device)
    want = _run(eager, inputs, upstream)
    assert want["out[0]"].isfinite().all() and want["dq"][:, 0].isnan().all() and want["dq"][:, 1:].isfinite().all()
    assert not _mismatches(_run(fused, inputs, upstream), want)


# ----------------------------------------------------------------------------------------------
# fp16: the same rules in 16 bits (a subset of targets), and outputs that overflow the 16-bit range
# ----------------------------------------------------------------------------------------------
def _sa_op16(device):
    eager, fused, inputs, upstream = _sa_op(device)
    return eager, fused, {k: v.half() for k, v in inputs.items()}, upstream


FP16 = {  # name -> setup(device)
    "grid_softmax": lambda device: _grid(True, device, torch.float16),
    "grid_sigmoid": lambda device: _grid(False, device, torch.float16),
    "self_attention": _sa_op16,
    "residual_gate": lambda device: _gate(device, torch.float16),
    "cbam": lambda device: _cbam(False, True, device, torch.float16),
    "light_cbam": lambda device: _cbam(True, False, device, torch.float16),
}
FP16_CASES = [("grid_softmax", "l"), ("grid_softmax", "W_l.weight"), ("grid_softmax", "phi.bias"),
              ("grid_sigmoid", "g"), ("grid_sigmoid", "phi.weight"), ("self_attention", "q"),
              ("self_attention", "k"), ("self_attention", "v"), ("self_attention", "gamma"),
              ("residual_gate", "m"), ("residual_gate", "t"), ("cbam", "x"), ("cbam", "channel.fc2.weight"),
              ("light_cbam", "x"), ("light_cbam", "spatial.conv.bn.weight")]


@pytest.mark.parametrize("backend, name, target", matrix(FP16_CASES, [
    ("grid_softmax", "l"), ("grid_sigmoid", "phi.weight"), ("self_attention", "k"), ("self_attention", "gamma"),
    ("residual_gate", "t"), ("cbam", "x"), ("light_cbam", "spatial.conv.bn.weight")]))
def test_fp16(request, backend, name, target, device):
    request.getfixturevalue(backend)
    check_nonfinite(*FP16[name](device), target, wheres=("one",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_output_overflow(request, backend, device):
    """A result beyond 65504 is +-inf in fp16 as in eager: out = (1 + sigmoid(m)) * t at t = +-6e4 and
    dt = grad * (1 + sigmoid(m)) at grad = 4e4, with sigmoid(m) near 1 (~1.2e5 and ~8e4: far from the
    boundary, no rounding decides it; no eager intermediate overflows where the result does not)."""
    request.getfixturevalue(backend)
    eager, fused, inputs, upstream = _gate(device, torch.float16)
    inputs["m"][0, 0, 0, :3] = 8.0
    inputs["t"][0, 0, 0, :3] = torch.tensor([6e4, -6e4, 1e-3])
    upstream[0][0, 0, 0, :3] = torch.tensor([1.0, 1.0, 4e4])
    want = _run(eager, inputs, upstream)
    assert want["out[0]"].isinf().sum() == 2 and want["dt"].isinf().sum() == 1
    assert not _mismatches(_run(fused, inputs, upstream), want)


# ----------------------------------------------------------------------------------------------
# attention pooling with a linear score (LTPA LinearAttentionBlock, timm GlobalContext pooling)
# ----------------------------------------------------------------------------------------------
def _pool_op(device, variant, dtype=torch.float32):
    from attnfast.ops import attention_pool
    from attnfast.reference.attention_pool import attention_pool_reference

    g_shape, norm, red = {"ltpa-softmax": ((2, 6, 1, 1), "softmax", "sum"),
                          "ltpa-sigmoid": ((2, 6, 1, 1), "sigmoid", "mean"),
                          "map-softmax": ((2, 6, 4, 5), "softmax", "sum")}[variant]

    def wrap(fn):
        return _Fn(lambda l, w, b, g: fn(l, w, b, g, normalize=norm, reduce=red))

    inputs = {"l": _randn(2, 6, 4, 5, device=device).to(dtype), "w": _randn(1, 6, 1, 1, device=device).to(dtype),
              "b": _randn(1, device=device).to(dtype), "g": _randn(*g_shape, device=device).to(dtype)}
    return (wrap(attention_pool_reference), wrap(attention_pool), inputs,
            [_randn(2, 1, 4, 5, device=device), _randn(2, 6, device=device)])


POOL_CASES = [(v, t) for v in ("ltpa-softmax", "ltpa-sigmoid", "map-softmax") for t in ("l", "w", "b", "g")]
POOL_TRITON = [(v, t) for v in ("ltpa-softmax", "ltpa-sigmoid") for t in ("l", "w", "g")] + [("map-softmax", "g")]


@pytest.mark.parametrize("backend, variant, target", matrix(POOL_CASES, POOL_TRITON))
def test_attention_pool(request, backend, variant, target, device):
    request.getfixturevalue(backend)
    check_nonfinite(*_pool_op(device, variant), target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_pool_fp16(request, backend, device):
    request.getfixturevalue(backend)
    check_nonfinite(*_pool_op(device, "ltpa-softmax", torch.float16), "l", wheres=("one",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_pool_minus_inf_leading_tiles(request, backend, device):
    """The first 140 of 160 pixels score -inf (several tiles and splits), the rest finite: probability 0 there and
    a finite pooled output (NaN only in the channel holding the infinities, 0 * inf), as eager softmax gives."""
    request.getfixturevalue(backend)
    eager, fused, inputs, _ = _pool_op(device, "ltpa-softmax")
    inputs["w"] = inputs["w"].abs()
    inputs["w"][0, 0] = -inputs["w"][0, 0]
    inputs["l"] = _randn(2, 6, 8, 20, device=device)
    inputs["l"][:, 0, :7] = float("inf")
    upstream = [_randn(2, 1, 8, 20, device=device), _randn(2, 6, device=device)]
    want = _run(eager, inputs, upstream)
    assert want["out[1]"][:, 0].isnan().all() and want["out[1]"][:, 1:].isfinite().all()
    assert not _mismatches(_run(fused, inputs, upstream), want)
