"""attnfast.models.timm_models: timm names (``resnet50-cbam``, ``resnet18-lcbam``, plain timm names) -> timm models."""
import sys

import pytest
import torch

from attnfast.models import timm_models

timm = pytest.importorskip("timm")


def test_parse_name():
    assert timm_models.parse_name("resnet50-cbam") == ("resnet50", "cbam")
    assert timm_models.parse_name("resnet18-lcbam") == ("resnet18", "lcbam")
    assert timm_models.parse_name("resnet50.a1_in1k") == ("resnet50.a1_in1k", None)
    assert timm_models.parse_name("-cbam") == ("-cbam", None)  # a suffix alone names nothing


def test_resnet50_cbam_is_timms_resnet50_with_cbam_blocks():
    model = timm_models.create("resnet50-cbam", 5, attention="reference")
    direct = timm.create_model("resnet50", pretrained=False, num_classes=5, block_args=dict(attn_layer="cbam"))
    assert type(model) is type(direct)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in direct.state_dict().items()}
    cbam = timm_models.attention_modules(model)
    assert len(cbam) == 16 and set(cbam.values()) == {"CbamModule"}  # one per bottleneck (3+4+6+3)
    assert "layer1.0.se" in cbam
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_light_cbam_plain_names_and_dropout():
    light = timm_models.attention_modules(timm_models.create("resnet18-lcbam", 1, attention="reference"))
    assert len(light) == 8 and set(light.values()) == {"LightCbamModule"}
    plain = timm_models.create("resnet18.a1_in1k", 3, attention="reference")  # a pretrained tag, still built with pretrained=False
    assert not timm_models.attention_modules(plain) and plain.fc.out_features == 3
    assert timm_models.create("resnet18-cbam", 2, attention="reference", drop_rate=0.3).drop_rate == 0.3


def test_bad_names():
    with pytest.raises(ValueError, match="'nope' is not a timm model name"):
        timm_models.create("nope-cbam", 2)
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 takes no block_args.*ResNet family"):
        timm_models.create("vit_tiny_patch16_224-cbam", 2)


def test_without_timm_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ImportError, match=r"timm is not installed \(pip install timm, or pip install 'attnfast\[timm\]'\)"):
        timm_models.create("resnet50-cbam", 2)


def test_create_model_takes_timm_names():
    from attnfast.models import create_model

    ref = create_model("resnet18-cbam", 3, attention="reference")
    assert len(timm_models.attention_modules(ref)) == 8  # timm's own CbamModule, untouched
    report = []
    fused = timm_models.create("resnet18-cbam", 3, attention="fused", report=report)
    (line,) = report
    assert line.startswith("attnfast.swap ") and "resnet18-cbam" in line
    assert len(timm_models.attention_modules(fused)) == 0, line  # every CbamModule swapped
    from attnfast.nn.cbam import CBAM

    assert sum(isinstance(m, CBAM) for m in fused.modules()) == 8
    fused.load_state_dict(ref.state_dict())  # swap keeps the state-dict keys: weights move both ways
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention must be 'fused' or 'reference'"):
        create_model("resnet18-cbam", 3, attention="fast")


def test_create_model_without_timm(monkeypatch):
    from attnfast.models import create_model

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="model 'resnet50-cbam' is not one of attnfast's .* timm is not installed"):
        create_model("resnet50-cbam", 2)


def test_create_model_reports_what_swap_did():
    """``create_model(..., report=)``: the trainer's one way to build any model (issue 16 item 4)."""
    from attnfast.models import create_model

    report = []
    create_model("resnet18-cbam", 3, attention="fused", report=report)
    assert report == ["attnfast.swap replaced 8 modules of resnet18-cbam with fused ones (8 CbamModule -> CBAM)"]
    report = []
    create_model("resnet18-cbam", 3, attention="reference", report=report)
    create_model("attnvgg", 2, report=report, width_mult=0.125)
    assert report == []  # nothing swapped, nothing to say
