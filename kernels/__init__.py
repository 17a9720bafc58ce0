"""Triton kernels of attnfast, installed as ``attnfast.kernels``.

Only ``@triton.jit`` kernels and their launch functions live here: pure functions on tensors,
no autograd and no modules. Every module that defines kernels exposes ``aot_configs()``, the
list of every (kernel, dtype, block, warps) configuration its launchers can pick; the AOT tooling
(``attnfast.kernels.aot``, which no launcher imports) collects them and compiles each for sm_80 and
sm_90 on a CPU.

Set ``TRITON_INTERPRET=1`` *before* importing a kernel module to run the kernels on CPU.
"""
