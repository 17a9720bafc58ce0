import os

import pytest
import torch
import torch.nn as nn

from attnfast.models import AttnVGG, ResidualAttentionNet, create_model
from attnfast.models.attnvgg import POOL_INDICES, vgg16_bn_weights_path


def test_vgg16_bn_pool_indices_match_torchvision():
    from torchvision.models import vgg16_bn

    layers = list(vgg16_bn(weights=None).features.children())
    assert tuple(i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)) == POOL_INDICES == (6, 13, 23, 33, 43)


@pytest.mark.parametrize("size", [224, 512])
def test_attnvgg_shapes_full_width(size):
    m = AttnVGG(num_classes=2, normalize_attn=True).eval()
    with torch.no_grad():
        logits, a1, a2 = m(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 2)
    assert a1.shape == (1, 1, size // 8, size // 8) and a2.shape == (1, 1, size // 16, size // 16)
    torch.testing.assert_close(a1.sum(), torch.tensor(1.0))
    names = dict(m.named_parameters())
    assert names["attn1.W_l.weight"].shape == (256, 256, 1, 1)
    assert names["attn1.W_g.weight"].shape == (256, 512, 1, 1)
    assert names["attn2.W_l.weight"].shape == (256, 512, 1, 1)
    assert names["cls.weight"].shape == (2, 512 + 512 + 256)
    assert "conv_block1.0.weight" in names and "conv_block5.0.weight" in names


def test_attnvgg_sigmoid_mode_and_non_square():
    m = AttnVGG(num_classes=1, width_mult=0.125).eval()
    with torch.no_grad():
        logits, a1, a2 = m(torch.randn(2, 3, 96, 64))
    assert logits.shape == (2, 1) and a1.shape == (2, 1, 12, 8) and a2.shape == (2, 1, 6, 4)
    assert ((a1 > 0) & (a1 < 1)).all()


def test_attnvgg_bad_input():
    m = AttnVGG(num_classes=1, width_mult=0.125)
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="attention"):
        AttnVGG(num_classes=1, attention="flash")


def test_attnvgg_pretrained_absent_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = vgg16_bn_weights_path()
    assert path.startswith(str(tmp_path)) and path.endswith(".pth")
    with pytest.raises(FileNotFoundError, match=os.path.basename(path)):
        AttnVGG(num_classes=1, pretrained=True)


def test_attnvgg_pretrained_loads_from_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import vgg16_bn

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    src = vgg16_bn(weights=None)
    path = vgg16_bn_weights_path()
    os.makedirs(os.path.dirname(path))
    torch.save(src.state_dict(), path)
    m = AttnVGG(num_classes=1, pretrained=True)
    torch.testing.assert_close(m.conv_block1[0].weight, src.features[0].weight)
    torch.testing.assert_close(m.conv_block5[-3].weight, src.features[40].weight)


@pytest.mark.parametrize("depth", [56, 92])
@pytest.mark.parametrize("size", [224, (96, 160)])
def test_ran_shapes(depth, size):
    size = (size, size) if isinstance(size, int) else size
    width = 64 if size == (224, 224) else 16
    m = ResidualAttentionNet(depth, num_classes=5, width=width).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, *size)).shape == (1, 5)


def test_ran_module_counts_and_params():
    from attnfast.reference import ResidualAttentionModule

    count = lambda m: sum(isinstance(x, ResidualAttentionModule) for x in m.modules())  # noqa: E731
    assert count(ResidualAttentionNet(56, 10)) == 3
    assert count(ResidualAttentionNet(92, 10)) == 6
    n56 = sum(p.numel() for p in ResidualAttentionNet(56, 1000).parameters()) / 1e6
    assert 25 < n56 < 35  # the paper reports 31.9M for Attention-56


def test_ran_bad_input():
    m = ResidualAttentionNet(56, 3, width=8)
    with pytest.raises(ValueError, match="at least 64"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match="56 or 92"):
        ResidualAttentionNet(101, 3)


def test_ran_fused_matches_reference():
    ref = ResidualAttentionNet(56, 3, width=8, attention="reference").eval()
    fused = ResidualAttentionNet(56, 3, width=8, attention="fused").eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


def test_create_model_rejects_unknown():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000", 2)
