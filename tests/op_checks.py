"""One check per attnfast op against its float64 reference, on any device (three-way rule).

The CPU matrix (tests/ops, tests/nn: Triton interpreted, and the PyTorch path) and the GPU matrix
(the same tests on CUDA, plus tests/gpu/test_real_shapes.py) call these functions; only shapes,
dtype and device differ. Each one:

- builds the float64 reference on ``device`` (a GPU run keeps its float64 work on the GPU),
- gives the same weights, cast to the dtype under test, to eager PyTorch and to attnfast,
- runs forward and backward with the same upstream gradients, and asserts the forward outputs and
  every gradient (inputs and parameters) with ``attnfast.testing.assert_close_3way``: the error vs
  float64 is at most ``factor`` (2) times eager PyTorch's error in the same dtype, plus a small atol.

fp32 on CUDA: the conftest turns TF32 off for every test (cuDNN convs and matmuls), so fp32 means
IEEE fp32 in eager PyTorch and in the kernels alike. ``tf32(True)`` turns it on for the cases that
test the TF32 path; those compare against eager fp16, whose inputs carry the same 10-bit mantissa.

Adding an op: write ``check_<op>`` here, use it in the op's CPU test file (taking the ``device``
fixture so it runs on CUDA too), and list its real shapes in tests/gpu/test_real_shapes.py;
tests/test_gpu_matrix.py then expects its GPU cases in every dtype.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attnfast.nn.grid_attention import GridAttention
from attnfast.nn.self_attention import SelfAttention2d
from attnfast.ops import residual_gate
from attnfast.reference import residual_gate_reference
from attnfast.reference.grid_attention import GridAttention as RefGridAttention
from attnfast.reference.self_attention import SelfAttention
from attnfast.testing import BASE_ATOL, assert_close_3way


def dtype_params(*dtypes):
    """pytest params for ``dtypes`` (ids like ``torch.float32``); bfloat16 is GPU-marked, because the
    Triton interpreter's bf16 arithmetic is wrong (it runs, with both backends, on a CUDA machine)."""
    return [pytest.param(d, id=str(d), marks=[pytest.mark.gpu] if d == torch.bfloat16 else [])
            for d in dtypes]


@contextlib.contextmanager
def tf32(enabled: bool):
    """Allow (or forbid) TF32 for cuDNN convolutions and CUDA matmuls inside the block.

    Both through the legacy flags, together (setting them also sets the ``fp32_precision`` API's
    values). Reading them raises on recent torch once something mixed the two APIs; then the state
    found cannot be read back, and the block's setting stays afterwards."""
    try:
        old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        old = None
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        if old is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _randn(*shape, gen, device):
    """float64 normal samples drawn on the CPU (the same numbers on every device), then moved."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)


# ----------------------------------------------------------------------------------------------
# grid attention (attnfast::grid_attention through attnfast.nn.GridAttention)
# ----------------------------------------------------------------------------------------------
def grid_ref(C, Cg, A, up, normalize, seed=0, device="cpu"):
    torch.manual_seed(seed)
    ref = RefGridAttention(C, Cg, A, up, normalize_attn=normalize).double()
    with torch.no_grad():
        ref.phi.bias.uniform_(-0.5, 0.5)
    return ref.to(device)


def grid_inputs(B, C, Cg, H, W, up, seed=1, device="cpu"):
    """(l, g, da, dpooled) in float64 on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return (_randn(B, C, H, W, gen=gen, device=device), _randn(B, Cg, H // up, W // up, gen=gen, device=device),
            _randn(B, 1, H, W, gen=gen, device=device), _randn(B, C, gen=gen, device=device))


def grid_run(module, l, g, da=None, dp=None, *, loss=None):
    """Forward + backward; returns (a, pooled, dl, dg, dW_l, dW_g, dphi_w, dphi_b)."""
    module.zero_grad(set_to_none=True)
    l = l.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    a, pooled = module(l, g)
    if loss is None:
        terms = []
        if da is not None:
            terms.append((a * da.to(a.dtype)).sum())
        if dp is not None:
            terms.append((pooled * dp.to(a.dtype)).sum())
        loss = sum(terms)
    else:
        loss = loss(a, pooled)
    loss.backward()
    return (a.detach(), pooled.detach(), l.grad, g.grad, module.W_l.weight.grad, module.W_g.weight.grad,
            module.phi.weight.grad, module.phi.bias.grad)


def grid_modules(ref, dtype, eager_dtype=None):
    """(eager reference module, fused module) with ``ref``'s weights, on ``ref``'s device."""
    dev = ref.phi.weight.device
    eager = RefGridAttention(ref.in_features_l, ref.in_features_g, ref.attn_features, ref.up_factor,
                             ref.normalize_attn).to(device=dev, dtype=eager_dtype or dtype)
    eager.load_state_dict(ref.state_dict())
    fused = GridAttention(ref.in_features_l, ref.in_features_g, ref.attn_features, ref.up_factor,
                          ref.normalize_attn).to(device=dev, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return eager, fused


def check_grid(B, C, Cg, A, H, W, up, normalize, dtype, *, device="cpu", da_on=True, dp_on=True,
               channels_last=False, seed=0, eager_dtype=None):
    """Forward (a, pooled) and all six gradients (l, g, W_l, W_g, phi.weight, phi.bias) vs float64.

    ``eager_dtype`` (default ``dtype``) is the dtype of the eager run that sets the tolerance
    (fp16 for the TF32 path)."""
    ref = grid_ref(C, Cg, A, up, normalize, seed, device)
    l, g, da, dp = grid_inputs(B, C, Cg, H, W, up, seed + 1, device)
    da = da if da_on else None
    dp = dp if dp_on else None
    eager, fused = grid_modules(ref, dtype, eager_dtype)

    def cast(t, dt):
        t = t.to(dt)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    out64 = grid_run(ref, l, g, da, dp)
    et = eager_dtype or dtype
    out_eager = grid_run(eager, cast(l, et), cast(g, et), da, dp)
    out = grid_run(fused, cast(l, dtype), cast(g, dtype), da, dp)
    for o in out:
        assert o.dtype == dtype and o.device == l.device
    assert_close_3way(out, out64, out_eager,
                      name=f"grid[B={B},C={C},Cg={Cg},A={A},{H}x{W},up={up},norm={normalize},{dtype},{device}]")
    return out


# ----------------------------------------------------------------------------------------------
# SAGAN self-attention (attnfast::self_attention through attnfast.nn.SelfAttention2d)
# ----------------------------------------------------------------------------------------------
def sagan_layers(c, gamma, dtype, device="cpu", qk_mult=3.0):
    """(float64 reference SelfAttention, eager SelfAttention, fused SelfAttention2d) with one weight set.

    ``qk_mult`` scales the query/key weights: 3 gives logits of order 10 at small C (a peaked softmax)."""
    ref64 = SelfAttention(c).double()
    with torch.no_grad():
        ref64.gamma.fill_(gamma)
        for conv in (ref64.query_conv, ref64.key_conv):
            conv.weight.mul_(qk_mult)
    eager = SelfAttention(c).to(dtype)
    eager.load_state_dict(ref64.state_dict())
    fused = SelfAttention2d(c).to(dtype)
    fused.load_state_dict(ref64.state_dict())
    return ref64.to(device), eager.to(device), fused.to(device)


def module_grads(layer, fn, x, grad):
    """[out, x.grad, parameter grads sorted by name] of ``fn(layer, x)`` with upstream ``grad``."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(layer, x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


def _first(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


def assert_sagan_close(layer, out, ref, eager, name, x, grad, factor=2.0):
    """Three-way check of ``module_grads`` results (float64 input ``x``, upstream ``grad``). Two scalars
    or near-scalars get the scale of what they sum instead of their own value:

    - the key bias adds q_i^T b to a whole softmax row, so its exact gradient is 0 and the computed one
      is pure rounding noise (a sum over N positions of rounded dK): factor 4, at the scale of the key
      weight gradient;
    - ``gamma.grad = sum(grad * T)`` over every element, with ``out = gamma * T + x``: a sum of B*C*N
      terms of either sign whose value can be far below its terms, while its rounding error grows with
      them. atol at the root-sum-square of the terms (the scale of a random walk of their rounding)."""
    names = ["out", "x.grad"] + [n + ".grad" for n, _ in sorted(layer.named_parameters())]
    for n, o, r, e in zip(names, out, ref, eager, strict=True):
        if n == "key_conv.bias.grad":
            scale = max(1.0, ref[names.index("key_conv.weight.grad")].abs().max().item())
            assert_close_3way(o, r, e, name=f"{n} {name}", factor=max(4.0, factor),
                              atol=BASE_ATOL[o.dtype] * scale)
        elif n == "gamma.grad" and layer.gamma.item() != 0:
            terms = grad * (ref[0] - x) / layer.gamma.detach().double()
            scale = max(1.0, r.abs().max().item(), terms.square().sum().sqrt().item())
            assert_close_3way(o, r, e, name=f"{n} {name}", factor=factor, atol=BASE_ATOL[o.dtype] * scale)
        else:
            assert_close_3way(o, r, e, name=f"{n} {name}", factor=factor)


def check_sagan(shape, dtype, *, device="cpu", gamma=0.7, qk_mult=3.0):
    """The seed's layer: SelfAttention2d vs the reference SelfAttention (forward, x and every parameter grad)."""
    ref64, eager, fused = sagan_layers(shape[1], gamma, dtype, device, qk_mult)
    x = torch.randn(shape, dtype=torch.float64).to(device)  # the test's seeded stream, on the CPU
    g = torch.randn(shape, dtype=torch.float64).to(device)
    ref = module_grads(ref64, _first, x, g)
    e = module_grads(eager, _first, x.to(dtype), g.to(dtype))
    out = module_grads(fused, _first, x.to(dtype), g.to(dtype))
    assert out[0].dtype == dtype and out[0].device == x.device
    assert_sagan_close(fused, out, ref, e, f"sagan{tuple(shape)} {dtype} {device}", x, g)


def sagan_variant_math(layer, x):
    """The pooled / multi-head / value_dim variants of SelfAttention2d in plain PyTorch (any dtype)."""
    b, c, h, w = x.shape
    hd = layer.heads
    q = F.conv2d(x, layer.query_conv.weight, layer.query_conv.bias)
    k = F.conv2d(x, layer.key_conv.weight, layer.key_conv.bias)
    v = F.conv2d(x, layer.value_conv.weight, layer.value_conv.bias)
    if layer.pool:
        k, v = F.max_pool2d(k, 2, ceil_mode=True), F.max_pool2d(v, 2, ceil_mode=True)
    nk = k.shape[-2] * k.shape[-1]
    qh, kh, vh = q.reshape(b, hd, -1, h * w), k.reshape(b, hd, -1, nk), v.reshape(b, hd, -1, nk)
    attn = torch.softmax(layer.scale * qh.transpose(-1, -2) @ kh, -1)  # (B, hd, N, NK)
    o = (vh @ attn.transpose(-1, -2)).reshape(b, -1, h, w)
    if layer.out_conv is not None:
        o = F.conv2d(o, layer.out_conv.weight, layer.out_conv.bias)
    return layer.gamma * o + x


def check_sagan_variant(shape, options, dtype, *, device="cpu", gamma=0.9, factor=None):
    """SelfAttention2d(**options) vs ``sagan_variant_math`` in float64 (forward, x and every parameter grad).

    Pooled keys get factor 4: max-pool routes each key gradient to one of four positions, so a
    rounding difference that flips an argmax moves a whole gradient entry."""
    c = shape[1]
    layer64 = SelfAttention2d(c, **options).double()
    with torch.no_grad():
        layer64.gamma.fill_(gamma)
    x = torch.randn(shape, dtype=torch.float64).to(device)  # the test's seeded stream, on the CPU
    g = torch.randn(shape, dtype=torch.float64).to(device)
    layer = SelfAttention2d(c, **options)
    layer.load_state_dict(layer64.state_dict())
    layer64, layer = layer64.to(device), layer.to(device=device, dtype=dtype)
    ref = module_grads(layer64, sagan_variant_math, x, g)
    eager = module_grads(layer, sagan_variant_math, x.to(dtype), g.to(dtype))
    out = module_grads(layer, _first, x.to(dtype), g.to(dtype))
    assert out[0].dtype == dtype and out[0].device == x.device
    if factor is None:
        factor = 4.0 if options.get("pool") else 2.0
    assert_sagan_close(layer, out, ref, eager, f"variant {options} {tuple(shape)} {dtype} {device}", x, g, factor)


# ----------------------------------------------------------------------------------------------
# residual gate (attnfast::residual_gate)
# ----------------------------------------------------------------------------------------------
def gate_run(fn, m, t, grad):
    m = m.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(m, t)
    out.backward(grad)
    return out.detach(), m.grad, t.grad


def check_gate(shape, dtype, *, device="cpu", channels_last=False):
    """``(1 + sigmoid(m)) * t``: output and both gradients vs float64; layout kept for channels_last."""
    m, t, g = (torch.randn(shape, dtype=torch.float64).to(device) for _ in range(3))  # the test's seeded stream
    m = m * 3
    if channels_last:
        m, t, g = (x.to(memory_format=torch.channels_last) for x in (m, t, g))
    ref = gate_run(residual_gate_reference, m, t, g)
    eager = gate_run(residual_gate_reference, m.to(dtype), t.to(dtype), g.to(dtype))
    out = gate_run(residual_gate, m.to(dtype), t.to(dtype), g.to(dtype))
    for o in out:
        assert o.dtype == dtype and o.device == m.device
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last), "output should keep channels_last"
    assert_close_3way(out, ref, eager, name=f"residual_gate{tuple(shape)} {dtype} {device}")


# ----------------------------------------------------------------------------------------------
# CBAM (attnfast::cbam), against timm's modules in float64
# ----------------------------------------------------------------------------------------------
def make_timm(C, light, seed=0, rd_ratio=0.25, mlp_bias=False, kernel=7):
    from timm.layers import cbam as timm_cbam  # a test extra: imported where it is used

    torch.manual_seed(seed)
    cls = timm_cbam.LightCbamModule if light else timm_cbam.CbamModule
    m = cls(C, rd_ratio=rd_ratio, mlp_bias=mlp_bias, spatial_kernel_size=kernel).double()
    bn = m.spatial.conv.bn
    with torch.no_grad():  # non-trivial BatchNorm state and weights
        bn.weight.fill_(1.3)
        bn.bias.fill_(-0.2)
        bn.running_mean.fill_(0.1)
        bn.running_var.fill_(0.7)
        for p in m.channel.parameters():
            p.mul_(3.0)
    return m


def fused_like(ref, light, dtype, device):
    from attnfast.nn.cbam import CBAM, LightCBAM

    C = ref.channel.fc1.in_channels
    m = (LightCBAM if light else CBAM)(C, rd_channels=ref.channel.fc1.out_channels,
                                       spatial_kernel_size=ref.spatial.conv.conv.kernel_size[0],
                                       mlp_bias=ref.channel.fc1.bias is not None)
    m.load_state_dict(ref.state_dict())
    return m.to(device=device, dtype=dtype)


def run(module, x, grad, train):
    module.train(train)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    grads = [p.grad.detach().clone() for p in module.parameters()]
    return [y.detach(), x.grad] + grads


def check_cbam(shape, dtype, light, train, device, channels_last=False, **kw):
    # the truth uses the weights and inputs as rounded to ``dtype``: only the computation's error is compared
    ref = make_timm(shape[1], light, **kw).to(device=device, dtype=dtype).double()
    eager = make_timm(shape[1], light, **kw).to(device=device, dtype=dtype)
    fused = fused_like(ref, light, dtype, device)
    x = (torch.randn(shape, dtype=torch.float64, device=device) * 2).to(dtype).double()
    g = torch.randn(shape, dtype=torch.float64, device=device).to(dtype).double()
    xd, gd = x.to(dtype), g.to(dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    out_ref = run(ref, x, g, train)
    out_eager = run(eager, xd, gd, train)
    out = run(fused, xd, gd, train)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
        assert out[1].is_contiguous(memory_format=torch.channels_last)
    assert_close_3way([o.cpu() for o in out], [o.cpu() for o in out_ref], [o.cpu() for o in out_eager],
                      name=f"cbam{shape}[{dtype},light={light},train={train}]")
    for name, buf in ref.spatial.conv.bn.named_buffers():  # running statistics updated as BatchNorm does
        if buf.is_floating_point():  # stored in ``dtype``: bf16 rounds them by up to 2**-9 relative, as eager's
            assert_close_3way(getattr(fused.spatial.conv.bn, name).cpu(), buf.cpu(),
                              getattr(eager.spatial.conv.bn, name).cpu(), name=name)
        else:
            assert torch.equal(getattr(fused.spatial.conv.bn, name), buf), name


# ----------------------------------------------------------------------------------------------
# attention pooling with a linear score (attnfast::attention_pool), against its float64 reference
# ----------------------------------------------------------------------------------------------
def attention_pool_inputs(B, C, H, W, g_kind, bias, seed=0, device="cpu", logit_scale=1.0):
    """float64 (l, weight, bias or None, g or None, dc, dpooled) on ``device``; g_kind: None, "pooled" (B, C, 1, 1),
    "pooled1" (1, C, 1, 1) or "map" (B, C, H, W). ``logit_scale`` scales the weight (peaked softmax)."""
    gen = torch.Generator().manual_seed(seed)
    l = _randn(B, C, H, W, gen=gen, device=device)
    w = _randn(1, C, 1, 1, gen=gen, device=device) * (logit_scale / C ** 0.5)
    b = _randn(1, gen=gen, device=device) if bias else None
    g = {None: None, "pooled": (B, C, 1, 1), "pooled1": (1, C, 1, 1), "map": (B, C, H, W)}[g_kind]
    g = _randn(*g, gen=gen, device=device) if g is not None else None
    return l, w, b, g, _randn(B, 1, H, W, gen=gen, device=device), _randn(B, C, gen=gen, device=device)


def attention_pool_run(fn, l, w, b, g, dc, dp, normalize, reduce, *, dtype, channels_last=False, dc_on=True):
    """Forward + backward of ``fn`` (the op or its reference) in ``dtype``: [c, pooled, dl, dw, (db), (dg)]."""
    def leaf(t):
        if t is None:
            return None
        t = t.to(dtype)
        if channels_last and t.dim() == 4 and t.shape[2] * t.shape[3] > 1:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.detach().requires_grad_()

    lv, wv, bv, gv = (leaf(t) for t in (l, w, b, g))
    c, pooled = fn(lv, wv, bv, gv, normalize=normalize, reduce=reduce)
    loss = (pooled * dp.to(dtype)).sum()
    if dc_on:
        loss = loss + (c * dc.to(dtype)).sum()
    loss.backward()
    return [c.detach(), pooled.detach()] + [t.grad for t in (lv, wv, bv, gv) if t is not None]


def check_attention_pool(B, C, H, W, dtype, *, g_kind="pooled", normalize="softmax", reduce="sum", bias=False,
                         device="cpu", channels_last=False, seed=0, dc_on=True, logit_scale=1.0):
    """attention_pool's outputs (c, pooled) and gradients (l, weight, bias, g) vs float64, three-way; the truth
    takes the inputs as rounded to ``dtype`` (only the computation's error is compared)."""
    from attnfast.ops import attention_pool
    from attnfast.reference.attention_pool import attention_pool_reference

    inputs = [t if t is None else t.to(dtype).double()
              for t in attention_pool_inputs(B, C, H, W, g_kind, bias, seed, device, logit_scale)]
    args = dict(normalize=normalize, reduce=reduce, channels_last=channels_last, dc_on=dc_on)
    ref = attention_pool_run(attention_pool_reference, *inputs, dtype=torch.float64, **args)
    eager = attention_pool_run(attention_pool_reference, *inputs, dtype=dtype, **args)
    out = attention_pool_run(attention_pool, *inputs, dtype=dtype, **args)
    for o in out:
        assert o.dtype == dtype and o.device.type == torch.device(device).type
    if channels_last:
        assert out[2].is_contiguous(memory_format=torch.channels_last), "dl should keep channels_last"
    assert_close_3way(out, ref, eager, name=f"attention_pool[{B}x{C}x{H}x{W},g={g_kind},{normalize},{reduce},"
                                            f"bias={bias},{dtype},{device},cl={channels_last}]")
    return out
