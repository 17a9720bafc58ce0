"""attnfast.config: the environment is read once, at import; run-time changes go through the module.

Also the one dispatch rule (``attnfast._dispatch.kernel_eligible``) that every op asks with the backend it reads."""
import os
import subprocess
import sys

import pytest
import torch

import attnfast.config as config
from attnfast import _dispatch


def _child(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k != "ATTNFAST_BACKEND"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_environment_read_once_at_import():
    """ATTNFAST_BACKEND set before import is the backend; changing os.environ afterwards changes nothing."""
    code = ("import os, attnfast.config as c; a = c.get_backend(); os.environ['ATTNFAST_BACKEND'] = 'triton'; "
            "print(a, c.get_backend(), c.cache_dir())")
    assert _child(code, ATTNFAST_BACKEND=" Torch ", ATTNFAST_CACHE="/tmp/somewhere").split() == \
        ["torch", "torch", "/tmp/somewhere"]
    assert _child(code).split()[:2] == ["auto", "auto"]


def test_an_invalid_environment_value_fails_at_the_first_op_not_at_import():
    code = ("import torch, attnfast, attnfast.ops as ops\n"
            "try:\n    ops.residual_gate(torch.zeros(2), torch.zeros(2))\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    out = _child(code, ATTNFAST_BACKEND="cuda")
    assert out.startswith("ValueError: ATTNFAST_BACKEND must be one of auto, triton, torch; got 'cuda'"), out


def test_set_backend_and_the_context_manager(monkeypatch):
    monkeypatch.setattr(config, "BACKEND", "auto")
    with config.backend("torch"):
        assert config.get_backend() == "torch" and _dispatch.backend_setting() == "torch"
        with pytest.raises(RuntimeError, match="inside"):
            with config.backend("triton"):
                assert config.get_backend() == "triton"
                raise RuntimeError("inside")
        assert config.get_backend() == "torch"  # restored after the exception
    assert config.get_backend() == "auto"
    assert config.set_backend("TORCH") == "auto" and config.BACKEND == "torch"
    for bad in ("gpu", None, 3):
        with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
            config.set_backend(bad)
    assert config.BACKEND == "torch"


def test_cache_dir_at_run_time(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)
    old = config.set_cache_dir(tmp_path)
    assert config.cache_dir() == str(tmp_path) and old
    with pytest.raises(ValueError, match="non-empty path"):
        config.set_cache_dir("")


def test_kernel_eligible_is_the_one_rule(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.setattr(config, "BACKEND", "torch")
    assert not _dispatch.kernel_eligible("op", x)
    monkeypatch.setattr(config, "BACKEND", "auto")
    assert not _dispatch.kernel_eligible("op", x)  # CPU tensors: the PyTorch path
    if not _dispatch.interpreter_enabled():
        return
    monkeypatch.setattr(config, "BACKEND", "triton")
    assert _dispatch.kernel_eligible("op", x)
    assert not _dispatch.kernel_eligible("op", x.double())  # no kernels for float64
    assert not _dispatch.kernel_eligible("op", x, limit=lambda: "too wide")
    with pytest.raises(RuntimeError, match="bfloat16 cannot run on the Triton interpreter"):
        _dispatch.kernel_eligible("op", x.bfloat16())
