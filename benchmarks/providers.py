"""Every provider the benchmarks time, built here once: the pytest-benchmark suites (``test_bench_*.py``) and
the GPU runner (``gpu_bench.py``) take their modules and functions from this file, so a baseline is spelled
one way everywhere.

Providers, per op (all compute the same function with the same weights):

- ``eager``: attnfast's plain-PyTorch reference module (``attnfast.reference``), what the seeds run;
- ``compile``: ``harness.compiled(eager)``: ``torch.compile(..., dynamic=False)`` through a backend that
  counts compiled-graph calls, so a result can prove it ran compiled (``harness.CompileCounter``);
- ``fused``: attnfast's module (Triton kernels on CUDA; the PyTorch path on a CPU);
- self-attention only: ``sdpa_default``, ``sdpa_mem_efficient``, ``sdpa_flash_padded`` and ``flex``
  (``sdpa_providers.py``: the attention core the way users call it, around the same 1x1 convs), and
  ``chunked`` (``SelfAttention2d`` on its PyTorch path, ``ATTNFAST_BACKEND=torch``).

Modules are cached per (shape parameters, dtype, device): eager and compile share one module, and a
compiled provider is compiled once per input shape, never once per test.

Training steps (``train_step``) and the largest batch that fits (``largest_batch``) live here too.
"""
from __future__ import annotations

import contextlib
import functools
import gc

import torch

import attnfast.config
import harness
import sdpa_providers

GRID_PROVIDERS = ("eager", "compile", "fused")
BLOCK_PROVIDERS = ("eager", "compile", "fused")  # CBAM, residual gate, attention pooling
SAGAN_PROVIDERS = ("eager", "compile") + sdpa_providers.PROVIDERS + ("chunked", "fused")
TRAIN_PROVIDERS = ("reference", "fused")


@contextlib.contextmanager
def backend_env(value: str | None):
    """attnfast's backend set to ``value`` (None: ``auto``) inside the block (``attnfast.config.backend``),
    restored after."""
    with attnfast.config.backend(value or "auto"):
        yield


class OnBackend:
    """``fn`` called with attnfast's backend ``value`` (e.g. ``torch``: attnfast's PyTorch path on CUDA)."""

    def __init__(self, fn, value: str):
        self.fn, self.value = fn, value

    def __call__(self, *args):
        with backend_env(self.value):
            return self.fn(*args)

    def context(self):
        """attnfast's backward dispatches again: run it in this context too (``harness.provider_context``)."""
        return backend_env(self.value)

    def parameters(self):
        return self.fn.parameters()


def _pick(table: dict, names) -> dict:
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(table)}")
    return {n: table[n] for n in names}


def randn(shape, dtype, device, seed, requires_grad=True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------
# grid attention (AttnVGG / AttnMel)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _grid_modules(c, cg, a, up, normalize, dtype, device):
    from attnfast.nn.grid_attention import GridAttention
    from attnfast.reference.grid_attention import GridAttention as Ref

    torch.manual_seed(0)
    ref = Ref(c, cg, a, up, normalize_attn=normalize).to(device=device, dtype=dtype)
    fused = GridAttention(c, cg, a, up, normalize_attn=normalize).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def grid(c, cg, a, up, dtype, device, names=GRID_PROVIDERS, normalize=True) -> dict:
    ref, fused = _grid_modules(c, cg, a, up, normalize, dtype, device)
    return _pick({"eager": ref, "compile": harness.compiled(ref), "fused": fused}, names)


def grid_roofline(b, c, hw, cg, up, a, elt) -> dict:
    """Minimal bytes and FLOPs of grid attention per mode: the forward reads l, g and the weights and writes
    the map and the pooled features (FLOPs: 2*B*H*W*A*C_l for W_l l, 2*B*h*w*A*C_g for W_g g, ~12*B*H*W*A for
    the bilinear tap, add, ReLU and phi, 2*B*H*W*C_l for the pooling); the backward re-reads them and writes
    their gradients (two GEMMs of the forward's size for W_l, the low-resolution W_g ones, per-pixel work)."""
    px, px_g = b * hw * hw, b * (hw // up) ** 2
    bytes_fwd = elt * (px * c + px_g * cg + a * (c + cg + 1) + 1 + px + b * c)
    flops_fwd = 2 * px * a * c + 2 * px_g * a * cg + 12 * px * a + 2 * px * c
    flops_bwd = 4 * px * a * c + 4 * px_g * a * cg + 16 * px * a + 4 * px * c
    bytes_bwd = elt * (2 * px * c + 2 * px_g * cg + 2 * a * (c + cg + 1) + px + b * c)
    return {"fwd": (bytes_fwd, flops_fwd), "bwd": (bytes_bwd, flops_bwd),
            "fwd+bwd": (bytes_fwd + bytes_bwd, flops_fwd + flops_bwd)}


def grid_inputs(b, c, hw, cg, up, dtype, device, seed=0) -> list:
    return [randn((b, c, hw, hw), dtype, device, seed), randn((b, cg, hw // up, hw // up), dtype, device, seed + 1)]


# ----------------------------------------------------------------------------------------------
# SAGAN self-attention
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def sagan_modules(c, dtype, device, gamma=0.5):
    """The seed's layer (reference, returns ``(out, attention)``) and attnfast's, same weights."""
    from attnfast.nn.self_attention import SelfAttention2d
    from attnfast.reference.self_attention import SelfAttention

    torch.manual_seed(0)
    ref = SelfAttention(c).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref.gamma.fill_(gamma)
    fused = SelfAttention2d(c, tuple_output=False).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


class FirstOutput(torch.nn.Module):
    """The reference layer's ``out`` alone (its attention matrix is not part of the compared output)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


class SdpaBlock(torch.nn.Module):
    """``gamma * attend(q, k, v) + x`` with the reference layer's convs, q/k/v in SDPA's contiguous
    ``(B, 1, N, d)`` layout (``sdpa_providers.user_layout``), SAGAN's scale 1."""

    def __init__(self, ref, provider: str):
        super().__init__()
        self.ref, self.provider = ref, provider
        self.attend = sdpa_providers.attention(provider)
        self.counter = getattr(self.attend, "counter", None)  # flex: proof that its compiled graph ran

    def qkv(self, x):
        return [sdpa_providers.user_layout(conv(x)) for conv in (self.ref.query_conv, self.ref.key_conv,
                                                                  self.ref.value_conv)]

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x)
        o = self.attend(q, k, v, 1.0)
        return self.ref.gamma * o.squeeze(1).transpose(1, 2).reshape(b, c, h, w) + x

    def backend(self, x) -> dict:
        """What this provider runs on ``x`` in training (q, k, v requiring grad when ``x`` does): the backend
        SDPA's dispatch picks, and the attention ops a profiled forward + backward recorded
        (``sdpa_providers.profiled_ops``). Leaves gradients in ``x`` and the weights: clear them after."""
        q, k, v = self.qkv(x)
        choice = sdpa_providers.backend_of(self.provider, q, k, v, 1.0)

        def run():
            o = self.attend(q, k, v, 1.0)
            if o.requires_grad:
                o.backward(torch.ones_like(o))

        return {"sdpa_choice": choice, "profiled": sdpa_providers.profiled_ops(run)}


@functools.lru_cache(maxsize=None)
def _sagan_table(c, dtype, device):
    ref, fused = sagan_modules(c, dtype, device)
    eager = FirstOutput(ref)
    table = {"eager": eager, "compile": harness.compiled(eager), "chunked": OnBackend(fused, "torch"),
             "fused": fused}
    table.update({p: SdpaBlock(ref, p) for p in sdpa_providers.PROVIDERS})
    return table


def sagan(c, dtype, device, names=SAGAN_PROVIDERS) -> dict:
    return _pick(_sagan_table(c, dtype, device), names)


@functools.lru_cache(maxsize=None)
def sagan_variant(c, dtype, device, options: tuple):
    """``SelfAttention2d(c, **options)`` (pooled keys, heads, value_dim): ``fused`` and its PyTorch path
    ``chunked`` (no reference layer has these options)."""
    from attnfast.nn.self_attention import SelfAttention2d

    torch.manual_seed(0)
    m = SelfAttention2d(c, tuple_output=False, **dict(options)).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    return {"fused": m, "chunked": OnBackend(m, "torch")}


# ----------------------------------------------------------------------------------------------
# CBAM and the residual-attention gate
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cbam_modules(channels, dtype, device, light):
    from attnfast.nn.cbam import CBAM, LightCBAM
    from attnfast.reference.cbam import CBAM as Ref
    from attnfast.reference.cbam import LightCBAM as LightRef

    torch.manual_seed(0)
    ref = (LightRef if light else Ref)(channels).to(device=device, dtype=dtype).train()
    fused = (LightCBAM if light else CBAM)(channels).to(device=device, dtype=dtype).train()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def cbam(channels, dtype, device, names=BLOCK_PROVIDERS, light=False) -> dict:
    """BatchNorm in train mode (a training step's CBAM)."""
    ref, fused = _cbam_modules(channels, dtype, device, light)
    return _pick({"eager": ref, "compile": harness.compiled(ref), "fused": fused}, names)


def gate(names=BLOCK_PROVIDERS) -> dict:
    """``(1 + sigmoid(m)) * t``: eager reference, compiled reference, attnfast's op."""
    from attnfast.ops import residual_gate
    from attnfast.reference import residual_gate_reference

    return _pick({"eager": residual_gate_reference, "compile": harness.compiled(residual_gate_reference),
                  "fused": residual_gate}, names)


# ----------------------------------------------------------------------------------------------
# attention pooling with a linear score (LTPA LinearAttentionBlock, timm GlobalContext)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _attention_pool_modules(kind, channels, dtype, device):
    """``ltpa``: Learn to Pay Attention's LinearAttentionBlock (softmax); ``gc``: timm's GlobalContext (its
    defaults: softmax pooling, the scale MLP) and attnfast's drop-ins, same weights."""
    from attnfast.nn.attention_pool import GlobalContext, LinearAttentionBlock
    from attnfast.reference.attention_pool import LinearAttentionBlock as Ref

    torch.manual_seed(0)
    if kind == "ltpa":
        ref, fused = Ref(channels), LinearAttentionBlock(channels)
    else:
        from timm.layers.global_context import GlobalContext as Ref  # noqa: N806 - timm is a benchmark extra

        ref, fused = Ref(channels), GlobalContext(channels)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device=device, dtype=dtype), fused.to(device=device, dtype=dtype)


def attention_pool(kind, channels, dtype, device, names=BLOCK_PROVIDERS) -> dict:
    ref, fused = _attention_pool_modules(kind, channels, dtype, device)
    return _pick({"eager": ref, "compile": harness.compiled(ref), "fused": fused}, names)


# ----------------------------------------------------------------------------------------------
# training steps
# ----------------------------------------------------------------------------------------------
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainStep:
    """One optimizer step of ``build_model(model_name, 1, attention, kwargs)`` (forward, the training
    CLI's focal loss, backward, Adam); ``step(x, y)``; ``inputs(batch)`` makes a batch on the device."""

    def __init__(self, model_name, size, kwargs, attention, amp, device):
        from attnfast.train import build_model

        if amp not in AMP:
            raise ValueError(f"amp must be one of {sorted(AMP)}; got {amp!r}")
        self.size, self.amp, self.device = size, amp, device
        torch.manual_seed(0)
        self.model = build_model(model_name, 1, attention, dict(kwargs)).to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)

    def inputs(self, batch, seed=0) -> list:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, self.size, self.size, generator=gen).to(self.device)
        y = torch.randint(0, 2, (batch,), generator=gen).to(self.device)
        return [x, y]

    def __call__(self, x, y):
        from attnfast.train import compute_loss

        dtype = AMP[self.amp]
        with torch.autocast(self.device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.model(x)
            loss = compute_loss(out[0] if isinstance(out, tuple) else out, y, "binary")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def release(self):
        """Free the step's memory (a failed step leaves gradients behind)."""
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_batch(fits, start: int, cap: int, max_probes: int = 12, resolution: float = 1 / 32,
                  budget_bytes: int | None = None) -> dict:
    """The largest batch ``b <= cap`` with ``fits(b)``, assuming fits is monotone in b.

    ``fits(b)`` runs one step at batch b and returns its peak memory in bytes, or None when it ran out
    of memory. The peaks at ``start`` and ``2 * start`` give a line (bytes = intercept + slope * b) that
    predicts the limit from ``budget_bytes``, the growth that fits (default: the device's free memory plus
    the blocks PyTorch has cached but not allocated; on a CPU, ``cap``). Probes step up (or down) from the prediction by ``4 * resolution`` of it
    until the limit is bracketed, then bisect to ``resolution``; at most ``max_probes`` steps in all.

    Returns ``max_batch`` (fits), ``first_failing`` (ran out of memory; None if no probe did),
    ``exact`` (the two are within the resolution), ``capped`` (``cap`` itself fits) and ``probes``:
    ``[[batch, peak bytes or None], ...]`` in order."""
    probes = []

    def ok(b):
        peak = fits(b)
        probes.append([b, peak])
        return peak is not None

    def result(lo, hi):
        exact = hi is not None and hi - lo <= max(1, int(lo * resolution))
        return {"max_batch": lo, "first_failing": hi, "exact": exact, "capped": hi is None and lo >= cap,
                "probes": probes}

    if start < 1 or cap < 1:
        raise ValueError(f"start and cap must be positive; got {start}, {cap}")
    lo, hi = 0, None  # lo: largest batch seen to fit (0: none); hi: smallest seen to fail (None: none)
    b = min(start, cap)
    while not ok(b):  # the first batch already fails: halve until one fits
        hi = b
        if b == 1 or len(probes) >= max_probes:
            return result(0, hi)
        b //= 2
    lo = b
    if hi is None and lo < cap:
        b2 = min(2 * lo, cap)
        p1 = probes[-1][1]
        if not ok(b2):
            hi = b2
        else:
            slope = (probes[-1][1] - p1) / (b2 - lo)
            intercept = p1 - slope * lo
            lo = b2
            guess = cap
            if slope > 0 and (budget_bytes is not None or torch.cuda.is_available()):
                if budget_bytes is None:
                    budget_bytes = (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()
                                    - torch.cuda.memory_allocated())
                guess = int((budget_bytes - intercept) / slope)
            guess = max(lo + 1, min(guess, cap))
            step = max(1, int(guess * 4 * resolution))
            while hi is None and lo < cap and len(probes) < max_probes:  # up from the prediction
                if ok(guess):
                    lo, guess = guess, min(cap, guess + step)
                else:
                    hi = guess
                    down = guess - step
                    while down > lo and len(probes) < max_probes:  # and down, if it overshot
                        if ok(down):
                            lo = down
                            break
                        hi, down = down, down - step
    while hi is not None and hi - lo > max(1, int(lo * resolution)) and len(probes) < max_probes:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return result(lo, hi)


class OutOfTime(Exception):
    pass


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is PyTorch running out of (device) memory."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def step_largest_batch(step: TrainStep, start: int, cap: int, peak, deadline: float | None = None) -> dict:
    """``largest_batch`` for a training step: one step at batch 1 first (Adam's state is allocated once, not
    inside the first probe's peak), then ``fits(b)`` = ``peak(lambda: step(*step.inputs(b)))`` (bytes, or None
    when the step ran out of memory). ``peak(fn)`` runs fn and returns its peak memory growth (None where
    there is no allocator to ask: the probe's batch stands in). Past ``deadline`` (``time.time()``) or on
    another error the search stops and reports what its probes bracket, with ``error``."""
    import time

    seen = []

    def fits(b):
        if deadline is not None and time.time() >= deadline:
            raise OutOfTime("largest-batch search over its budget")
        try:
            x, y = step.inputs(b)
            grew = peak(lambda: step(x, y))
            grew = b if grew is None else grew
        except Exception as e:
            if not is_oom(e):
                raise
            grew = None
        finally:
            step.release()
        seen.append([b, grew])
        return grew

    try:
        step(*step.inputs(1))
        step.release()
        return largest_batch(fits, start, cap)
    except Exception as e:
        step.release()
        good = [b for b, g in seen if g is not None]
        bad = [b for b, g in seen if g is None]
        return {"max_batch": max(good) if good else None, "first_failing": min(bad) if bad else None,
                "exact": False, "capped": False, "probes": seen,
                "error": str(e) if isinstance(e, OutOfTime) else f"{type(e).__name__}: {e}"[:1000]}


# ----------------------------------------------------------------------------------------------
# attention gates (Attention U-Net): MONAI AttentionBlock, Attention-Gated-Networks GridAttentionBlock2D
# ----------------------------------------------------------------------------------------------
ATTENTION_GATE_PROVIDERS = ("eager", "compile", "fused")


@functools.lru_cache(maxsize=None)
def _attention_gate_modules(kind, c, cg, fi, dtype, device):
    """``kind`` "monai": ``AttentionBlock(2, f_int=fi, f_g=cg, f_l=c)``, forward(g, x); "agn":
    ``GridAttentionBlock2D(c, cg, fi)`` (2x2 theta), forward(x, g). Reference and fused, same weights, train mode."""
    from attnfast.nn import attention_gate as fused_mod
    from attnfast.reference import attention_gate as ref_mod

    torch.manual_seed(0)
    if kind == "monai":
        ref, fused = ref_mod.AttentionBlock(2, fi, cg, c), fused_mod.AttentionBlock(2, fi, cg, c)
    else:
        ref, fused = ref_mod.GridAttentionBlock2D(c, cg, fi), fused_mod.GridAttentionBlock2D(c, cg, fi)
    ref, fused = ref.to(device=device, dtype=dtype), fused.to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def attention_gate(kind, c, cg, fi, dtype, device, names=ATTENTION_GATE_PROVIDERS) -> dict:
    ref, fused = _attention_gate_modules(kind, c, cg, fi, dtype, device)
    return _pick({"eager": ref, "compile": harness.compiled(ref), "fused": fused}, names)


def attention_gate_inputs(kind, b, c, cg, hw, dtype, device, seed=0) -> list:
    """MONAI: (g, x), both hw x hw; AGN: (x at hw, g at hw / 2: the coarser level)."""
    if kind == "monai":
        return [randn((b, cg, hw, hw), dtype, device, seed), randn((b, c, hw, hw), dtype, device, seed + 1)]
    return [randn((b, c, hw, hw), dtype, device, seed), randn((b, cg, hw // 2, hw // 2), dtype, device, seed + 1)]


def attention_gate_traffic(kind, b, c, cg, hw, elt) -> dict:
    """Minimal HBM bytes per mode: the forward reads x and g once and writes the gated x (and AGN's map);
    the backward reads them and the upstream gradient and writes dx and dg."""
    x, g = b * c * hw * hw, b * cg * (hw * hw if kind == "monai" else (hw // 2) ** 2)
    m = b * hw * hw if kind == "agn" else 0
    fwd, bwd = elt * (2 * x + g + m), elt * (3 * x + 2 * g + m)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
