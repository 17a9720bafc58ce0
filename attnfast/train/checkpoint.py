"""Checkpoint files: atomic writes, loading without running code, and the RNG state a resumed run restores.

Every checkpoint holds only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None), so
``torch.load(path)`` with torch's default ``weights_only=True`` reads it, and attnfast itself never loads a
checkpoint any other way: a crafted file cannot run code. The RNG states are stored as tensors; checkpoints
written by attnfast before that (NumPy's state as an ``ndarray``) load with exactly the four NumPy globals
such a state needs allowed, nothing else.
"""
from __future__ import annotations

import errno
import os
import random
import tempfile

import numpy as np
import torch

from .errors import ConfigError, OutputError

FORMAT_VERSION = 2  # 1: RNG states as Python/NumPy objects (weights_only needs NumPy globals); 2: tensors
TRAINING_KEYS = ("epoch", "model", "optimizer", "rng", "best", "best_epoch", "history", "config", "meta")


def atomic_write(path: str, write_fn, mode: str = "wb") -> None:
    """Write through ``write_fn(file)`` to a temporary file beside ``path``, then ``os.replace`` it.

    Readers see the old file or the complete new one, never a partial write. The temporary file is named
    ``.<name>.<random>.tmp``; a process killed mid-write leaves it behind (:func:`stale_temporaries` finds it).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stale_temporaries(folder: str, name: str) -> list:
    """The temporary files :func:`atomic_write` left for ``folder/name`` when it was killed mid-write."""
    prefix = "." + name + "."
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, e) for e in entries if e.startswith(prefix) and e.endswith(".tmp")
            and os.path.isfile(os.path.join(folder, e))]


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_output(path: str, write_fn, mode: str = "wb", *, kept: str = "") -> None:
    """:func:`atomic_write`, with a failure turned into one :class:`OutputError` line: a full disk is named as
    such, and ``kept`` says what stays intact (the old file is never touched by a failed write)."""
    try:
        atomic_write(path, write_fn, mode)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full (no space left on device)"
        else:
            reason = e.strerror or str(e)
        raise OutputError(f"cannot write {path}: {reason}" + (f"; {kept}" if kept else "")) from None


def save_checkpoint(state: dict, path: str, *, kept: str = "") -> None:
    write_output(path, lambda f: torch.save(state, f), kept=kept)


def _legacy_numpy_globals() -> list:
    """The globals NumPy's RNG state pickles with (attnfast's checkpoints before format 2): no other type."""
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only, no code runs."""
    with torch.serialization.safe_globals(_legacy_numpy_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str, option: str, keys: tuple = ("meta", "model")) -> dict:
    """Load ``path`` for ``option`` (``--checkpoint``, ``--resume``): a :class:`ConfigError` line for a missing,
    empty, truncated, foreign, malicious or incomplete file instead of a traceback."""
    if not os.path.isfile(path):
        raise ConfigError(f"{option}: no checkpoint at {path}")
    try:
        ck = load_checkpoint(path)
    except Exception as e:  # zero bytes, truncated, random bytes, a pickle that wants to run code
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:  # torch's weights_only unpickler refused a global
            kind = "it holds Python objects other than tensors and plain values; attnfast never unpickles those"
        else:
            kind = f"{type(e).__name__}: the file is empty, truncated or not a torch file"
        raise ConfigError(f"{option} {path}: not a readable attnfast checkpoint ({kind})") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ConfigError(f"{option} {path}: not an attnfast checkpoint (no {', '.join(repr(k) for k in missing)} "
                          "entries)")
    if not isinstance(ck["model"], dict) or not isinstance(ck["meta"], dict):
        raise ConfigError(f"{option} {path}: not an attnfast checkpoint ('model' and 'meta' must be dicts)")
    return ck


# ------------------------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) RNG states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # format 1: the objects random.getstate() / np.random.get_state() return
        random.setstate(py)
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
