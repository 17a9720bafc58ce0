"""attnfast's user-facing settings, read once from the environment when this module is first imported.

===================  =============================================  ==========================================
environment          meaning                                        at run time
===================  =============================================  ==========================================
``ATTNFAST_BACKEND`` ``auto`` (default): CUDA tensors run the       ``attnfast.config.set_backend("torch")``,
                     Triton kernels, CPU tensors the PyTorch path;  or for a block:
                     ``torch``: the PyTorch path everywhere;        ``with attnfast.config.backend("torch"):``
                     ``triton``: the kernels everywhere (CPU        (restored on exit, also on an exception)
                     tensors need ``TRITON_INTERPRET=1``)
``ATTNFAST_CACHE``   folder of the synthetic datasets' cache        ``attnfast.config.set_cache_dir(path)``
                     (default ``~/.cache/attnfast``)
===================  =============================================  ==========================================

The environment is read once, here: setting ``ATTNFAST_BACKEND`` before ``import attnfast`` keeps working; setting
it in ``os.environ`` later changes nothing (use ``set_backend`` / ``backend``). Every op reads ``get_backend()``
at each call, so a change applies from the next call on, forward and backward alike.

An invalid ``ATTNFAST_BACKEND`` does not break ``import attnfast``: the first op call raises ValueError naming the
variable and the accepted values (``set_backend`` refuses a bad value at once).

Not settings of attnfast, so not here: ``TRITON_INTERPRET`` (Triton's own, which Triton reads when the kernel
module is imported; ``attnfast._dispatch.interpreter_enabled``) and torchrun's ``WORLD_SIZE`` / ``LOCAL_RANK``
(``attnfast.train.distributed``). Test-only knobs are module attributes the tests monkeypatch:
``attnfast._alloc.NAN_FILL``, ``attnfast.ops.self_attention.BLOCK_ELEMS_OVERRIDE``.
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("auto", "triton", "torch")


def _normalize(value) -> str:
    return (value if isinstance(value, str) else "").strip().lower() or "auto"


# The settings themselves (module attributes; tests may monkeypatch them).
BACKEND: str = _normalize(os.environ.get("ATTNFAST_BACKEND", "auto"))
_BACKEND_SOURCE = "ATTNFAST_BACKEND"  # where an invalid BACKEND came from, for the error message
CACHE_DIR: str = os.environ.get("ATTNFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnfast")


def _validated(mode, source: str) -> str:
    if not isinstance(mode, str) or _normalize(mode) not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {mode!r}")
    return _normalize(mode)


def get_backend() -> str:
    """The backend in force: ``"auto"``, ``"triton"`` or ``"torch"`` (ValueError for an invalid
    ``ATTNFAST_BACKEND`` from the environment)."""
    return _validated(BACKEND, _BACKEND_SOURCE)


def set_backend(mode: str) -> str:
    """Select the backend of every op from the next call on; returns the previous setting."""
    global BACKEND
    new = _validated(mode, "backend")
    old, BACKEND = BACKEND, new
    return old


@contextlib.contextmanager
def backend(mode: str):
    """``with attnfast.config.backend("torch"): ...``: the backend inside the block, restored after."""
    old = set_backend(mode)
    try:
        yield
    finally:
        global BACKEND
        BACKEND = old


def cache_dir() -> str:
    """Folder of attnfast's dataset cache (``ATTNFAST_CACHE`` at import, or ``set_cache_dir``)."""
    return CACHE_DIR


def set_cache_dir(path) -> str:
    """Move the dataset cache to ``path`` from now on; returns the previous folder."""
    global CACHE_DIR
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"the cache folder must be a non-empty path; got {path!r}")
    old, CACHE_DIR = CACHE_DIR, os.fspath(path)
    return old
