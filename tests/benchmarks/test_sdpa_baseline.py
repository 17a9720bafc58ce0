"""The SDPA baseline of the self-attention benchmarks, and attnfast's CPU memory against it.

- The providers run the path their names claim. SDPA gets the contiguous (B, heads, N, d) layout
  users pass and scale=1.0. ``sdpa_flash_padded`` runs PyTorch's flash kernel and raises rather
  than fall back; so does ``sdpa_mem_efficient`` (no such kernel on a CPU). ``sdpa_default`` runs
  what the default dispatch picks (math on CPU, where d_qk != d_v rules out flash). ``flex`` is
  compiled FlexAttention with d_qk != d_v and proves its compiled graph ran. Checked from the aten
  ops the profiler records, in benchmarks/sdpa_providers.py, providers.py and cpu_sdpa_compare.py.
- At a small but representative SAGAN shape (B=8, C=128, 32x32), attnfast's forward+backward
  keeps no more for backward and peaks no higher than SDPA flash with padded q/k. Deterministic:
  saved-tensor hooks and PyTorch's CPU allocator events.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import cpu_sdpa_compare  # noqa: E402
import harness  # noqa: E402
import providers  # noqa: E402
import sdpa_providers  # noqa: E402

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"
FLASH_CPU_BWD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
MATH = "aten::_scaled_dot_product_attention_math"


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record every F.scaled_dot_product_attention call's layout and scale."""
    calls = []
    orig = sdpa_providers.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append({"contiguous": all(t.is_contiguous() for t in (q, k, v)), "ndim": q.dim(),
                      "scale": kwargs.get("scale"), "d": (q.shape[-1], k.shape[-1], v.shape[-1])})
        return orig(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sdpa_providers.F, "scaled_dot_product_attention", spy)
    return calls


def _qkv(b=2, heads=1, n=48, d=4, dv=32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads * d, n, generator=gen)
    k = torch.randn(b, heads * d, n, generator=gen)
    v = torch.randn(b, heads * dv, n, generator=gen)
    return q, k, v


def test_user_layout_is_contiguous_b_heads_n_d():
    x = torch.randn(2, 12, 5, 7)
    t = sdpa_providers.user_layout(x, heads=3)
    assert t.shape == (2, 3, 35, 4) and t.is_contiguous()
    assert torch.equal(t, x.reshape(2, 3, 4, 35).transpose(-1, -2))


CPU_PROVIDERS = ("sdpa_default", "sdpa_flash_padded")  # the others have no training path on a CPU


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_provider_runs_the_backend_it_names(provider, sdpa_calls):
    q, k, v = (sdpa_providers.user_layout(t, heads=2).requires_grad_() for t in _qkv(heads=2))
    attend = sdpa_providers.attention(provider)
    o = attend(q, k, v, 1.0)
    ops = _ops(lambda: attend(q, k, v, 1.0).sum().backward())
    if provider == "sdpa_flash_padded":
        assert FLASH_CPU in ops and FLASH_CPU_BWD in ops and MATH not in ops
        assert sdpa_providers.backend_of(provider, q, k, v) == "FLASH_ATTENTION"
    else:
        # d_qk != d_v: flash cannot run, the CPU dispatch picks math, and the name says so
        assert MATH in ops and FLASH_CPU not in ops
        assert sdpa_providers.backend_of(provider, q, k, v) == "MATH"
    assert sdpa_calls and all(c["contiguous"] and c["ndim"] == 4 and c["scale"] == 1.0 for c in sdpa_calls)
    # zero-padding q/k leaves q^T k unchanged: both compute SAGAN attention (scale 1)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
    prof = sdpa_providers.profiled_ops(lambda: attend(q, k, v, 1.0))
    assert prof["backends"] == [sdpa_providers.backend_of(provider, q, k, v)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU has no memory-efficient kernel; a GPU does")
def test_mem_efficient_raises_on_cpu_instead_of_falling_back(sdpa_calls):
    """A number from sdpa_mem_efficient is always the memory-efficient kernel: where there is none, it raises."""
    q, k, v = (sdpa_providers.user_layout(t) for t in _qkv())
    with pytest.raises(RuntimeError, match="No viable backend"):
        sdpa_providers.attention("sdpa_mem_efficient")(q, k, v, 1.0)
    assert sdpa_providers.backend_of("sdpa_mem_efficient", q, k, v) == "EFFICIENT_ATTENTION"


def test_flex_is_compiled_takes_d_qk_not_d_v_and_proves_it_ran(monkeypatch):
    """Compiled FlexAttention with d_qk = 4, d_v = 32 (SAGAN's unequal dims) computes SAGAN attention with
    scale 1; its counter shows the compiled graph ran (forward: on a CPU it has no backward)."""
    import harness

    monkeypatch.setenv("ATTNFAST_BENCH_COMPILE_BACKEND", "eager")
    monkeypatch.setattr(harness, "_COMPILED", {})
    flex = sdpa_providers.attention("flex")
    assert isinstance(flex, harness.Compiled) and flex is sdpa_providers.attention("flex")
    q, k, v = (sdpa_providers.user_layout(t, heads=2) for t in _qkv(heads=2))
    before = flex.counter.snapshot()
    flex(q, k, v, 1.0)
    assert not flex.counter.verdict(before, 1)["valid"], "a call that compiled is no timing of compiled code"
    before = flex.counter.snapshot()
    o = flex(q, k, v, 1.0)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
    verdict = flex.counter.verdict(before, 1)
    assert verdict["valid"] and verdict["graphs"] == 1 and verdict["backend"] == "eager", verdict
    assert sdpa_providers.backend_of("flex", q, k, v) == "FLEX_ATTENTION"


@pytest.mark.filterwarnings("ignore:.*(kernel not used|require the last dimension).*:UserWarning")
def test_flash_padded_raises_instead_of_falling_back():
    q, k, v = (sdpa_providers.user_layout(t) for t in _qkv())
    v_strided = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # last-dim stride N: no fused kernel
    with pytest.raises(RuntimeError, match="No available kernel"):
        sdpa_providers.sdpa_flash_padded(q, k, v_strided)
    with pytest.raises(ValueError, match="pads q/k up to d_v"):
        sdpa_providers.sdpa_flash_padded(v, v, q)


@pytest.mark.parametrize("provider, op", [("sdpa_default", MATH), ("sdpa_flash_padded", FLASH_CPU)])
def test_bench_module_providers(provider, op, sdpa_calls):
    """The benchmarks' SDPA providers (providers.sagan): the user layout, the named backend, the backend
    record a result carries, and the reference layer's output."""
    ref, _ = providers.sagan_modules(16, torch.float32, "cpu")
    fn = providers.sagan(16, torch.float32, "cpu", [provider])[provider]
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    assert op in _ops(lambda: fn(x).sum().backward())
    assert sdpa_calls and all(c["contiguous"] and c["scale"] == 1.0 for c in sdpa_calls)
    want = "MATH" if provider == "sdpa_default" else "FLASH_ATTENTION"
    record = fn.backend(x)
    assert record["sdpa_choice"] == want and record["profiled"]["backends"] == [want]
    if provider == "sdpa_flash_padded":  # the training path is profiled (math's backward is plain aten ops)
        assert FLASH_CPU_BWD in record["profiled"]["ops"]
    torch.testing.assert_close(fn(x), ref(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider", cpu_sdpa_compare.PROVIDERS)
def test_compare_script_providers(monkeypatch, provider):
    """cpu_sdpa_compare.py's providers run the path they report."""
    monkeypatch.delenv("ATTNFAST_BACKEND", raising=False)  # the script's children run the default dispatch
    sa = sys.modules["attnfast.ops.self_attention"]
    monkeypatch.setattr(sa, "_cpu_path", sa._cpu_path)  # attnfast_batched patches it; undo afterwards
    step, info = cpu_sdpa_compare.make_step(provider, 2, 32, 64)
    ops = _ops(step)
    if provider.startswith("attnfast"):
        assert "attnfast::self_attention" in ops and "attnfast::self_attention_backward" in ops
        blocked = provider == "attnfast"
        assert info["path"] == ("blocked CPU path" if blocked else "batched chunked path")
        assert ("aten::_softmax" in ops) == blocked  # the blocked path's fused softmax
    else:
        want = {"sdpa_default": (MATH, "MATH"), "sdpa_flash_padded": (FLASH_CPU, "FLASH_ATTENTION")}[provider]
        assert want[0] in ops and info["sdpa_backend"] == want[1]


def _memory(provider):
    step, _ = cpu_sdpa_compare.make_step(provider, 8, 128, 32 * 32)
    step()  # warm up
    with harness.AllocatedPeak() as peak, harness.SavedBytes() as saved:
        step()
    return peak.peak, saved.total


def test_attnfast_no_heavier_than_sdpa_flash_padded(monkeypatch):
    """B=8, C=128 (d_qk=16, d_v=128), 32x32, forward+backward of gamma * attention + x: attnfast's
    saved-for-backward bytes and allocator peak are at most SDPA flash-padded's."""
    import importlib
    import attnfast.config
    SA = importlib.import_module("attnfast.ops.self_attention")
    monkeypatch.setattr(attnfast.config, "BACKEND", "auto")
    monkeypatch.setattr(SA, "BLOCK_ELEMS_OVERRIDE", None)
    ours_peak, ours_saved = _memory("attnfast")
    flash_peak, flash_saved = _memory("sdpa_flash_padded")
    mib = 2 ** 20
    msg = (f"attnfast peak {ours_peak / mib:.1f} MiB, saved {ours_saved / mib:.1f} MiB; "
           f"sdpa_flash_padded peak {flash_peak / mib:.1f} MiB, saved {flash_saved / mib:.1f} MiB")
    # flash saves q, k padded to d_v (2 x B*N*d_v), v, o, lse; attnfast saves q, k at d_qk, v, o, lse
    assert ours_saved <= flash_saved, msg
    assert ours_peak <= flash_peak, msg
    # and no N x N block: a B x N x N fp32 matrix alone would be 32 MiB here
    assert ours_peak < 8 * 1024 * 1024 * 4, msg
