"""attnfast.CBAM / attnfast.LightCBAM as drop-ins for timm's modules and attnfast.reference's."""
import pytest
import torch
import torch.nn as nn

import attnfast
from attnfast.nn.cbam import CBAM, LightCBAM
from attnfast.reference.cbam import CBAM as RefCBAM
from attnfast.reference.cbam import LightCBAM as RefLightCBAM

timm_cbam = pytest.importorskip("timm.layers.cbam")

PAIRS = [(CBAM, RefCBAM, "CbamModule"), (LightCBAM, RefLightCBAM, "LightCbamModule")]
KWARGS = [dict(), dict(rd_ratio=0.5, mlp_bias=True, spatial_kernel_size=5), dict(rd_channels=3, rd_divisor=4)]


def test_public_names_are_fused():
    assert attnfast.CBAM is CBAM and attnfast.LightCBAM is LightCBAM
    assert attnfast.nn.CBAM is CBAM


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        bn = m.spatial.conv.bn
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(1.7)
        bn.num_batches_tracked.fill_(5)
    return m


@pytest.mark.parametrize("kw", KWARGS, ids=str)
@pytest.mark.parametrize("fused_cls,ref_cls,timm_name", PAIRS, ids=["cbam", "light"])
def test_state_dicts_load_both_ways_and_outputs_match(torch_backend, fused_cls, ref_cls, timm_name, kw):
    tm = _randomize(getattr(timm_cbam, timm_name)(24, **kw)).double()
    ref = ref_cls(24, **kw).double()
    fused = fused_cls(24, **kw).double()
    sd = tm.state_dict()
    assert list(fused.state_dict()) == list(sd) == list(ref.state_dict())
    fused.load_state_dict(sd)
    ref.load_state_dict(fused.state_dict())
    tm2 = getattr(timm_cbam, timm_name)(24, **kw).double()
    tm2.load_state_dict(fused.state_dict())
    x = torch.randn(3, 24, 7, 5, dtype=torch.float64)
    for train in (False, True):
        for m in (tm, ref, fused, tm2):
            m.train(train)
        y = tm(x)
        for m in (ref, fused, tm2):
            torch.testing.assert_close(m(x), y, rtol=1e-10, atol=1e-10)
    for name, buf in tm.state_dict().items():  # running statistics and num_batches_tracked moved alike
        torch.testing.assert_close(fused.state_dict()[name], buf, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "0.3"])
def test_batchnorm_bookkeeping(torch_backend, momentum):
    tm = timm_cbam.CbamModule(16)
    fused = CBAM(16)
    fused.load_state_dict(tm.state_dict())
    tm.spatial.conv.bn.momentum = fused.spatial.conv.bn.momentum = momentum
    for _ in range(3):
        x = torch.randn(4, 16, 6, 6)
        torch.testing.assert_close(fused(x), tm(x))
    for name, buf in tm.spatial.conv.bn.named_buffers():
        torch.testing.assert_close(getattr(fused.spatial.conv.bn, name), buf, msg=name)


@pytest.mark.parametrize("cls", [CBAM, LightCBAM], ids=["cbam", "light"])
def test_a_rejected_input_leaves_the_batchnorm_alone(torch_backend, cls):
    """The op validates x; the module counts a batch (num_batches_tracked) and moves the running statistics
    only once the op accepted it."""
    m = cls(8).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for bad in (torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(2, 8, 5)):
        with pytest.raises(ValueError):
            m(bad)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    m(torch.randn(2, 8, 5, 5))
    assert m.spatial.conv.bn.num_batches_tracked.item() == before["spatial.conv.bn.num_batches_tracked"].item() + 1


def test_without_running_stats(torch_backend):
    tm = timm_cbam.CbamModule(8)
    tm.spatial.conv.bn = nn.BatchNorm2d(1, track_running_stats=False)
    fused = CBAM(8)
    fused.spatial.conv.bn = nn.BatchNorm2d(1, track_running_stats=False)
    fused.load_state_dict(tm.state_dict())
    x = torch.randn(2, 8, 5, 5)
    for train in (True, False):
        tm.train(train)
        fused.train(train)
        torch.testing.assert_close(fused(x), tm(x))


def test_constructor_arguments():
    m = CBAM(32, rd_ratio=1 / 8, spatial_kernel_size=3, mlp_bias=True, gate_layer=nn.Sigmoid, act_layer="relu",
             dtype=torch.float64)
    assert m.channel.fc1.weight.shape == (4, 32, 1, 1) and m.channel.fc1.bias.dtype == torch.float64
    assert m.spatial.conv.bn.running_var.dtype == torch.float64
    assert m.spatial.conv.conv.weight.shape == (1, 2, 3, 3)
    assert LightCBAM(32).spatial.conv.conv.weight.shape == (1, 1, 7, 7)
    with pytest.raises(ValueError, match="ReLU"):
        CBAM(32, act_layer=nn.GELU)
    with pytest.raises(ValueError, match="sigmoid"):
        LightCBAM(32, gate_layer="hard_sigmoid")
    with pytest.raises(ValueError, match="odd"):
        CBAM(32, spatial_kernel_size=4)


@pytest.mark.parametrize("backend", ["triton_backend", "torch_backend"])
def test_autocast_matches_eager_autocast(request, backend):
    """Under CPU autocast (fp16 here: the interpreter's bf16 is wrong) the op computes in fp32 inside
    and returns x's dtype; eager timm runs its convs in fp16."""
    request.getfixturevalue(backend)
    tm = timm_cbam.CbamModule(16).eval()
    fused = CBAM(16).eval()
    fused.load_state_dict(tm.state_dict())
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        y = fused(x)
        y_eager = tm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_eager.float(), rtol=2e-2, atol=2e-2)
