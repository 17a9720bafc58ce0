"""fp32 grid attention uses TF32 exactly when eager fp32 1x1 convolutions would (cuDNN's setting).

``precision_for`` reads the ``fp32_precision`` API (``torch.backends.cudnn.conv``, then its parents)
where torch has it and the legacy ``torch.backends.cudnn.allow_tf32`` otherwise, and never raises:
the legacy getter raises on recent torch once the two APIs were mixed. Runs under every installed
torch (the CI runs it with the lowest supported one too); settings are restored after each test.
"""
import types

import pytest
import torch

from attnfast.kernels import grid_attention as G

HAS_NEW_API = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")
needs_new_api = pytest.mark.skipif(not HAS_NEW_API, reason="torch without the fp32_precision API")
CUDA = torch.device("cuda")


def _legacy():
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return "raises"


@pytest.fixture(autouse=True)
def restore_precision_flags():
    """Save and restore the TF32 settings, parents first (setting a parent may reset its children)."""
    if not HAS_NEW_API:
        old = torch.backends.cudnn.allow_tf32
        yield
        torch.backends.cudnn.allow_tf32 = old
        return
    get, set_ = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    keys = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul")]
    saved = [(k, get(*k)) for k in keys]
    legacy = _legacy()
    yield
    for k, v in saved:
        set_(*k, v)
    if legacy != "raises":  # torch's legacy getter reads only what its legacy setter wrote
        torch.backends.cudnn.allow_tf32 = legacy
    assert [(k, get(*k)) for k in keys] == saved, "the TF32 settings were not restored"
    assert _legacy() == legacy


def _check(expected: bool):
    assert G.conv_tf32_allowed() is expected
    assert G.precision_for(torch.float32, CUDA) == ("tf32" if expected else "ieee")
    assert G.precision_for(torch.float32, "cuda:1") == ("tf32" if expected else "ieee")
    # never TF32 for 16-bit inputs or off CUDA (the interpreter; eager CPU convs are not cuDNN's)
    assert G.precision_for(torch.float16, CUDA) == "ieee"
    assert G.precision_for(torch.bfloat16, CUDA) == "ieee"
    assert G.precision_for(torch.float32, "cpu") == "ieee"
    legacy = _legacy()
    if legacy != "raises":  # where torch's own legacy getter answers, it agrees
        assert legacy is expected


@pytest.mark.parametrize("enabled", [True, False])
def test_legacy_flag(enabled):
    torch.backends.cudnn.allow_tf32 = enabled
    _check(enabled)


@needs_new_api
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_new_api_conv_setting(setting):
    torch.backends.cudnn.conv.fp32_precision = setting
    _check(setting == "tf32")


@needs_new_api
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_new_api_inherited_from_the_parents(setting):
    """conv ``"none"`` inherits from ``torch.backends.cudnn``, which inherits from ``torch.backends``."""
    torch.backends.fp32_precision = setting
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "none"
    _check(setting == "tf32")
    torch.backends.cudnn.fp32_precision = "ieee" if setting == "tf32" else "tf32"
    torch.backends.cudnn.conv.fp32_precision = "none"
    _check(setting != "tf32")


@needs_new_api
def test_all_none_is_ieee():
    torch.backends.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.conv.fp32_precision = "none"
    _check(False)


@needs_new_api
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_mixed_apis_do_not_raise(setting):
    """conv and rnn set apart through the new API: torch's legacy getter raises, precision_for does not."""
    torch.backends.cudnn.conv.fp32_precision = setting
    torch.backends.cudnn.rnn.fp32_precision = "ieee" if setting == "tf32" else "tf32"
    assert _legacy() == "raises"
    _check(setting == "tf32")


@pytest.mark.parametrize("enabled", [True, False])
def test_torch_without_the_new_api(monkeypatch, enabled):
    """An older torch (no ``fp32_precision``): the legacy flag decides."""
    monkeypatch.setattr(torch.backends, "cudnn", types.SimpleNamespace(allow_tf32=enabled))
    assert G.conv_tf32_allowed() is enabled


def test_a_raising_legacy_getter_counts_as_not_allowed(monkeypatch):
    class Raising:
        @property
        def allow_tf32(self):
            raise RuntimeError("mixed TF32 APIs")

    monkeypatch.setattr(torch.backends, "cudnn", Raising())
    assert G.conv_tf32_allowed() is False


def test_launchers_pass_precision_for(triton_backend, monkeypatch):
    """The fp32 launches take ``precision_for(dtype, device)``: IEEE on CPU tensors (interpreter)
    whatever the cuDNN setting."""
    from attnfast.ops.grid_attention import grid_attention

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["PRECISION"])
                return self.kernel[grid](*args, **kw)
            return launch

    for name in ("grid_fwd_kernel", "grid_bwd_kernel", "grid_bwd_weight_kernel"):
        monkeypatch.setattr(G, name, Spy(getattr(G, name)))
    torch.backends.cudnn.allow_tf32 = True
    l = torch.randn(1, 8, 4, 4, requires_grad=True)
    g = torch.randn(1, 8, 2, 2, requires_grad=True)
    w_l, w_g = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    phi_w, phi_b = torch.randn(1, 16, requires_grad=True), torch.randn(1, requires_grad=True)
    a, pooled = grid_attention(l, g, w_l, w_g, phi_w, phi_b, 2)
    (a.sum() + pooled.sum()).backward()
    assert seen == ["ieee"] * 3
