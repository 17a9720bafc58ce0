"""AOT tooling of ``attnfast.kernels``: compile every kernel configuration, and the binaries real
launches run, for CUDA targets on a machine without a GPU, and read the evidence (registers, spills,
shared memory, occupancy, MMA instructions, atomics) from the compiled code.

Imported by the tools and the tests only: no launcher imports it (the kernel modules' ``aot_configs()``
import ``registry`` when called).

- ``registry``: ``KernelConfig``, the registry of every configuration (``all_configs``), ``compile_config``
- ``launches``: capture launches on CPU tensors as Triton specializes them; their binaries as configs
- ``budgets``: spill budgets, and the measurements behind them
- ``asm``: readers of TTGIR / PTX / SASS
- ``cli``: ``python -m attnfast.kernels.aot`` (the table; ``--help``)
"""
