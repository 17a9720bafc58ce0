"""Nothing attention-like goes unreported: recognised families without a fused op, the partly fusable RAN port,
out-of-scope channel gates and layers no family knows each get a report entry and a line in the warning;
modules under a reported or replaced layer are not reported again; networks named like attention are searched,
not reported; models without attention give no report at all."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import public_layers as P
from attnfast.swap import SwapWarning, swap
from seed_modules import SelfAttention

timm_layers = pytest.importorskip("timm.layers")


class MyGate(nn.Module):
    """Unknown by name: an additive gate no family has (a 3x3 scoring conv)."""

    def __init__(self, c):
        super().__init__()
        self.score = nn.Conv2d(c, 1, 3, padding=1)
        self.inner = nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid())  # would look like attention on its own

    def forward(self, x):
        return x * torch.sigmoid(self.score(x)) + self.inner(x)


class PixelWeighting(nn.Module):
    """Unknown by structure: a Sigmoid child next to a conv (no attention word in the name)."""

    def __init__(self, c):
        super().__init__()
        self.proj = nn.Conv2d(c, 1, 1)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x * self.act(self.proj(x))


class Mixer(nn.Module):
    """Unknown by structure: its forward calls softmax over space."""

    def __init__(self, c):
        super().__init__()
        self.key = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        w = F.softmax(self.key(x).flatten(2), dim=-1)
        return (x.flatten(2) * w).sum(-1)


class AttnNet(nn.Module):
    """A network named like attention: searched, not reported (it holds a recognised layer)."""

    def __init__(self):
        super().__init__()
        self.sagan = SelfAttention(16, None)
        self.body = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(20)])


def _zoo():
    return nn.ModuleDict({
        "ltpa": P.LinearAttentionBlock(16),
        "agn": P.GridAttentionBlock2D(16, 16),
        "gc": timm_layers.GlobalContext(16),
        "se": timm_layers.SEModule(16),
        "eca": timm_layers.EcaModule(16),
        "ran": P.ResidualAttentionModel(width=16, size=4),
        "mygate": MyGate(16),
        "pixel": PixelWeighting(16),
        "mixer": Mixer(16),
        "net": AttnNet(),
        "plain": nn.Sequential(nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU()),
    })


EXPECTED = [  # (path, status, family)
    ("se", "out of scope", "channel_gate"),
    ("eca", "out of scope", "channel_gate"),
    ("ran.attention_module1", "partly fusable", "ran_port"),
    ("mygate", "unknown", ""),
    ("pixel", "unknown", ""),
    ("mixer", "unknown", ""),
]


def test_every_attention_like_layer_is_reported_once():
    model = _zoo()
    with pytest.warns(SwapWarning) as record:
        result = swap(model)
    assert [(r.name, r.family) for r in result] == [("ltpa", "ltpa_linear"), ("agn", "agn_grid"),
                                                     ("gc", "timm_global_context"), ("net.sagan", "sagan")]
    assert [(s.name, s.status, s.family) for s in result.skipped] == EXPECTED
    assert len(record) == 1
    message = str(record[0].message)
    for s in result.skipped:
        assert f"[{s.status}] {s}" in message
    reasons = {s.name: s.reason for s in result.skipped}
    assert "residual_gate" in reasons["ran.attention_module1"]
    assert "channel-only gate" in reasons["se"]
    assert "class name has 'gate'" in reasons["mygate"]
    assert "Sigmoid gate (act)" in reasons["pixel"]
    assert "forward calls softmax" in reasons["mixer"]


def test_strict_raises_for_layers_left_alone_of_any_status():
    model = _zoo()
    with pytest.raises(ValueError, match=r"(?s)strict=True.*\[out of scope\] se.*\[partly fusable\] ran.*\[unknown\] mixer"):
        swap(model, strict=True)
    assert isinstance(model["net"].sagan, SelfAttention)  # nothing was changed


class Head(nn.Module):
    """A classifier head with a LogSoftmax child: not a gate."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.out = nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.out(self.fc(x.mean((2, 3))))


class SoftmaxClassifier(nn.Module):
    """A model whose forward ends in a softmax: the model itself is not taken for an attention layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = Head()

    def forward(self, x):
        return F.softmax(self.head(self.conv(x)), dim=1)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)),
    SoftmaxClassifier,
    lambda: pytest.importorskip("timm").create_model("resnet18", pretrained=False, num_classes=2),
    lambda: pytest.importorskip("timm").create_model("convnext_atto", pretrained=False, num_classes=2),
], ids=["sequential", "softmax_classifier", "timm_resnet18", "timm_convnext"])
def test_models_without_attention_report_nothing(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)
        result = swap(make(), dry_run=True)
    assert result == [] and result.skipped == []


def test_attnfast_models_report_nothing_after_swap():
    from attnfast.models import AttnVGG, ResidualAttentionNet

    for model in (AttnVGG(1, attention="fused", width_mult=0.125),
                  ResidualAttentionNet(56, num_classes=2, width=8, attention="fused")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SwapWarning)
            assert swap(model) == []  # already fused; AttnVGG / ResidualAttentionNet are searched, not reported


def test_timm_channel_gates_and_global_context_in_real_models():
    timm = pytest.importorskip("timm")
    model = timm.create_model("ecaresnet26t", pretrained=False, num_classes=2)
    with pytest.warns(SwapWarning):
        result = swap(model, dry_run=True)
    assert result.skipped and {(s.status, s.family) for s in result.skipped} == {("out of scope", "channel_gate")}
    model = timm.create_model("gcresnet33ts", pretrained=False, num_classes=2)
    result = swap(model, dry_run=True)  # every GlobalContext fused, nothing left alone
    assert not result.skipped and len(result) == 10 and {r.family for r in result} == {"timm_global_context"}


def test_monai_attention_block_is_swapped():
    attentionunet = pytest.importorskip("monai.networks.nets.attentionunet")
    model = attentionunet.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)
        result = swap(model, dry_run=True)
    assert [(r.family, r.new_type.rsplit(".", 1)[-1]) for r in result] == [("monai_attention", "AttentionBlock")]
    assert result.skipped == []
