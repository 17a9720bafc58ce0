import math

import pytest
import torch

from attnfast.reference import GridAttention
from seed_modules import AttentionBlock


def _unit(normalize, up_factor=1):
    m = GridAttention(1, 1, 1, up_factor, normalize_attn=normalize)
    with torch.no_grad():
        m.W_l.weight.fill_(1.0)
        m.W_g.weight.fill_(1.0)
        m.phi.weight.fill_(1.0)
        m.phi.bias.fill_(0.0)
    return m


def test_parameter_names_and_shapes():
    m = GridAttention(256, 512, 128, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"W_l.weight": (128, 256, 1, 1), "W_g.weight": (128, 512, 1, 1),
                      "phi.weight": (1, 128, 1, 1), "phi.bias": (1,)}


def test_hand_computed_softmax():
    m = _unit(True)
    l = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    g = torch.zeros(1, 1, 2, 2)
    a, pooled = m(l, g)
    e = [math.exp(v) for v in (1, 2, 3, 4)]
    expect_a = [v / sum(e) for v in e]
    torch.testing.assert_close(a.flatten(), torch.tensor(expect_a))
    torch.testing.assert_close(pooled, torch.tensor([[sum(w * v for w, v in zip(expect_a, (1, 2, 3, 4)))]]))
    assert a.shape == (1, 1, 2, 2) and pooled.shape == (1, 1)


def test_hand_computed_sigmoid_average():
    m = _unit(False)
    l = torch.tensor([-1.0, 0.5, 2.0, 4.0]).view(1, 1, 2, 2)
    a, pooled = m(l, torch.zeros(1, 1, 2, 2))
    sig = [1 / (1 + math.exp(-max(v, 0))) for v in (-1.0, 0.5, 2.0, 4.0)]  # relu before phi
    torch.testing.assert_close(a.flatten(), torch.tensor(sig))
    expect = sum(s * v for s, v in zip(sig, (-1.0, 0.5, 2.0, 4.0))) / 4
    torch.testing.assert_close(pooled, torch.tensor([[expect]]))


def test_hand_computed_bilinear_upsampling():
    # g = [0, 4] upsampled x2 (align_corners=False): source x = -0.25, 0.25, 0.75, 1.25 -> 0, 1, 3, 4 (edge clamp)
    m = _unit(True, up_factor=2)
    l = torch.zeros(1, 1, 2, 4)
    g = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2)
    a, _ = m(l, g)
    row = torch.tensor([0.0, 1.0, 3.0, 4.0])
    e = torch.exp(torch.cat([row, row]))
    torch.testing.assert_close(a.flatten(), e / e.sum())


@pytest.mark.parametrize("up_factor", [1, 2, 4, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_seed_block_and_loads_its_checkpoint(up_factor, normalize):
    seed = AttentionBlock(8, 16, 6, up_factor, normalize_attn=normalize)
    ours = GridAttention(8, 16, 6, up_factor, normalize_attn=normalize)
    ours.load_state_dict(seed.state_dict())
    seed.load_state_dict(ours.state_dict())
    l = torch.randn(3, 8, 3 * up_factor, 2 * up_factor)
    g = torch.randn(3, 16, 3, 2)
    for x, y in zip(ours(l, g), seed(l, g)):
        torch.testing.assert_close(x, y)


def test_softmax_attention_sums_to_one():
    m = GridAttention(8, 8, 4, 2)
    a, _ = m(torch.randn(4, 8, 14, 10), torch.randn(4, 8, 7, 5))
    torch.testing.assert_close(a.sum(dim=(1, 2, 3)), torch.ones(4))
    assert (a >= 0).all()


@pytest.mark.parametrize("l_shape,g_shape,match", [
    ((2, 8, 14, 14), (2, 16, 7), "4-D"),
    ((2, 8, 14), (2, 16, 7, 7), "4-D"),
    ((2, 9, 14, 14), (2, 16, 7, 7), "8 channels"),
    ((2, 8, 14, 14), (2, 15, 7, 7), "16 channels"),
    ((2, 8, 15, 14), (2, 16, 7, 7), "up_factor=2"),
    ((2, 8, 14, 14), (2, 16, 6, 7), "up_factor=2"),
    ((2, 8, 14, 14), (3, 16, 7, 7), "batch"),
])
def test_bad_shapes(l_shape, g_shape, match):
    m = GridAttention(8, 16, 4, 2)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(l_shape), torch.randn(g_shape))


def test_bad_dtype_and_up_factor():
    m = GridAttention(8, 16, 4, 2)
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(1, 8, 4, 4, dtype=torch.float64), torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        m(torch.ones(1, 8, 4, 4, dtype=torch.int32), torch.ones(1, 16, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="up_factor"):
        GridAttention(8, 16, 4, 1.5)
