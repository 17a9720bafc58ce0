import math

import pytest
import torch

from attnfast.reference import SelfAttention
from seed_modules import SelfAttention as SeedSelfAttention


def test_parameter_names_and_shapes():
    m = SelfAttention(64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"gamma": (1,), "query_conv.weight": (8, 64, 1, 1), "query_conv.bias": (8,),
                      "key_conv.weight": (8, 64, 1, 1), "key_conv.bias": (8,),
                      "value_conv.weight": (64, 64, 1, 1), "value_conv.bias": (64,)}
    assert float(m.gamma.detach()) == 0.0
    assert SelfAttention(4).query_conv.out_channels == 1  # in_dim // 8, at least 1


def test_hand_computed_two_positions():
    # in_dim=8 -> d=1. q = k = channel 0, v = identity, gamma = 1, no scale.
    m = SelfAttention(8)
    with torch.no_grad():
        for conv in (m.query_conv, m.key_conv):
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.bias.zero_()
        m.value_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        m.value_conv.bias.zero_()
        m.gamma.fill_(1.0)
    x = torch.zeros(1, 8, 1, 2)
    x[0, 0, 0] = torch.tensor([1.0, 2.0])
    x[0, 1, 0] = torch.tensor([5.0, -3.0])
    out, attn = m(x)
    # energy = [[1, 2], [2, 4]]; softmax over keys (last dim)
    r0 = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    r1 = [math.exp(2) / (math.exp(2) + math.exp(4)), math.exp(4) / (math.exp(2) + math.exp(4))]
    torch.testing.assert_close(attn[0], torch.tensor([r0, r1]))
    o_ch1 = [r0[0] * 5 + r0[1] * -3, r1[0] * 5 + r1[1] * -3]
    torch.testing.assert_close(out[0, 1, 0], torch.tensor(o_ch1) + x[0, 1, 0])
    assert attn.shape == (1, 2, 2)


def test_matches_seed_and_loads_its_checkpoint():
    seed = SeedSelfAttention(32, "relu")
    with torch.no_grad():
        seed.gamma.fill_(0.7)
    ours = SelfAttention(32)
    ours.load_state_dict(seed.state_dict())
    seed.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 5, 7)
    for a, b in zip(ours(x), seed(x)):
        torch.testing.assert_close(a, b)


def test_attention_rows_sum_to_one():
    _, attn = SelfAttention(16)(torch.randn(3, 16, 4, 6))
    assert attn.shape == (3, 24, 24)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 24))


def test_bad_inputs():
    m = SelfAttention(16)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="16 channels"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(1, 16, 4, 4, dtype=torch.float64))
