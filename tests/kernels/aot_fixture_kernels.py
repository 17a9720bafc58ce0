"""Fixture kernels with known answers for the AOT evidence checks (compiled by the session's one AOT run
through ``--module``; never launched).

- ``flash_fixture_kernel``: the forward attention loop (``s = q k^T``, ``acc += p v``), 16-bit, at tiles
  whose warp layout is known: 128x64 on 8 warps and 64x64 on 4 warps give every warp its own 16-row
  slices (no repeats); 64x64 on 8 warps (the old self-attention forward) and 32x32 on 8 warps (the
  old dQ / dK-dV) put more warps along M than the tile has 16-row slices, so warps repeat rows.
- ``atomic_fixture_kernel``: ``tl.atomic_add`` with Triton's default semantics (acq_rel: ordered) and
  with ``sem="relaxed"``.
"""
import triton
import triton.language as tl

from attnfast.kernels.aot.registry import KernelConfig, signature


@triton.jit
def flash_fixture_kernel(q_ptr, k_ptr, v_ptr, o_ptr, N,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + offs_m[:, None] * D + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        kt = tl.load(k_ptr + offs_n[None, :] * D + offs_d[:, None])
        s = tl.dot(q, kt)
        p = tl.exp(s - tl.max(s, 1)[:, None])
        v = tl.load(v_ptr + offs_n[:, None] * D + offs_d[None, :])
        acc += tl.dot(p.to(v.dtype), v)
    tl.store(o_ptr + offs_m[:, None] * D + offs_d[None, :], acc.to(o_ptr.dtype.element_ty))


@triton.jit
def atomic_fixture_kernel(ptr, x_ptr, RELAXED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    if RELAXED:
        tl.atomic_add(ptr + offs, x, sem="relaxed")
    else:
        tl.atomic_add(ptr + offs, x)


# name -> (BLOCK_M, BLOCK_N, num_warps, warps repeat rows)
FLASH_TILES = {
    "fixture.flash[128x64,w8]": (128, 64, 8, False),
    "fixture.flash[64x64,w4]": (64, 64, 4, False),
    "fixture.flash[64x64,w8]": (64, 64, 8, True),
    "fixture.flash[32x32,w8]": (32, 32, 8, True),
}
# name -> atomics are ordered
ATOMICS = {"fixture.atomic[default]": True, "fixture.atomic[relaxed]": False}


def aot_configs() -> list:
    configs = []
    for name, (bm, bn, warps, _) in FLASH_TILES.items():
        ce = {"BLOCK_M": bm, "BLOCK_N": bn, "D": 64}
        configs.append(KernelConfig(
            name=name, kernel=flash_fixture_kernel, constexprs=ce, num_warps=warps, num_stages=2,
            max_spill_bytes=1 << 20,  # a fixture: spills are not what it checks
            signature=signature(flash_fixture_kernel, ptrs={p: "fp16" for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")},
                                constexprs=ce)))
    for name, ordered in ATOMICS.items():
        ce = {"RELAXED": not ordered, "BLOCK": 256}
        configs.append(KernelConfig(
            name=name, kernel=atomic_fixture_kernel, constexprs=ce, num_warps=4,
            signature=signature(atomic_fixture_kernel, ptrs={"ptr": "fp32", "x_ptr": "fp32"}, constexprs=ce)))
    return configs
