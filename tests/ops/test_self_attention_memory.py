"""CPU memory of SAGAN self-attention: forward+backward at 128x128 (N = 16384), C = 64.

One N x N fp32 matrix is 1 GiB (the reference stores several). The chunked path must grow the
process's peak RSS by well under that. Measured in a fresh subprocess (ru_maxrss cannot be reset).
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, resource, time
import torch
from attnfast.nn.self_attention import SelfAttention2d

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

torch.manual_seed(0)
layer = SelfAttention2d(64)
with torch.no_grad():
    layer.gamma.fill_(0.5)
small = torch.randn(1, 64, 16, 16, requires_grad=True)
layer(small)[0].sum().backward()  # warm up: libraries, allocator, thread pools
x = torch.randn(1, 64, 128, 128, requires_grad=True)
g = torch.randn(1, 64, 128, 128)
layer.zero_grad()
base = peak_mib()
t0 = time.perf_counter()
out, _ = layer(x)
out.backward(g)
elapsed = time.perf_counter() - t0
ok = bool(torch.isfinite(x.grad).all() and torch.isfinite(layer.key_conv.weight.grad).all())
print(json.dumps({"base_mib": base, "peak_mib": peak_mib(), "growth_mib": peak_mib() - base,
                  "seconds": elapsed, "finite": ok}))
"""


def test_fwd_bwd_128x128_peak_rss_growth():
    env = dict(os.environ, ATTNFAST_BACKEND="torch")
    env.pop("ATTNFAST_NAN_FILL", None)
    # -P: the installed attnfast, never a checkout's attnfast/ from the current folder (it lacks kernels/)
    r = subprocess.run([sys.executable, "-P", "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    # 1 GiB = one N x N fp32 matrix; the chunked path holds a few 16 MiB score blocks plus O(N*C).
    assert res["growth_mib"] < 256, res
    print(res)


@pytest.mark.gpu
def test_gpu_peak_memory_b8_256x256_bf16(device, kernels_only):
    """(B=8, C=128, 256x256) forward+backward in bf16 runs, in far less than one N x N matrix per image."""
    import torch

    from attnfast.nn.self_attention import SelfAttention2d

    layer = SelfAttention2d(128).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(8, 128, 256, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, _ = layer(x)
    out.float().sum().backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < 8 * 2**30  # one N x N bf16 matrix per image would be 8 GiB alone
    assert torch.isfinite(x.grad).all()
