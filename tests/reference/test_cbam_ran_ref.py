import pytest
import torch

from attnfast.reference import CBAM, ResidualAttentionModule, residual_gate_reference


def test_cbam_parameter_names_match_timm():
    m = CBAM(64)
    assert set(m.state_dict()) == {
        "channel.fc1.weight", "channel.fc2.weight", "spatial.conv.conv.weight", "spatial.conv.bn.weight",
        "spatial.conv.bn.bias", "spatial.conv.bn.running_mean", "spatial.conv.bn.running_var",
        "spatial.conv.bn.num_batches_tracked"}
    assert m.channel.fc1.out_channels == 4  # 64 / 16


def test_cbam_hand_computed_gates():
    m = CBAM(2, rd_channels=1).eval()
    with torch.no_grad():
        m.channel.fc1.weight.zero_()
        m.channel.fc2.weight.zero_()  # channel gate = sigmoid(0) = 0.5
        m.spatial.conv.conv.weight.zero_()  # spatial gate = sigmoid(bn(0)) = 0.5 in eval with default stats
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(m(x), x * 0.25)


def test_cbam_shape_and_bad_input():
    m = CBAM(32)
    assert m(torch.randn(2, 32, 7, 9)).shape == (2, 32, 7, 9)
    with pytest.raises(ValueError, match="32 channels"):
        m(torch.randn(2, 16, 7, 9))


def test_residual_gate_reference_values():
    m = torch.tensor([0.0, 100.0, -100.0])
    t = torch.tensor([2.0, 3.0, 4.0])
    torch.testing.assert_close(residual_gate_reference(m, t), torch.tensor([3.0, 6.0, 4.0]))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("size", [(56, 56), (28, 28), (13, 17), (7, 7)])
def test_residual_attention_module_any_size(depth, size):
    m = ResidualAttentionModule(8, encoder_depth=depth).eval()
    x = torch.randn(2, 8, *size)
    assert m(x).shape == x.shape


def test_residual_attention_output_is_one_plus_mask_times_trunk():
    m = ResidualAttentionModule(8, encoder_depth=2).eval()
    x = torch.randn(1, 8, 16, 16)
    seen = {}
    orig_gate = m.gate

    def spy(mask_logits, trunk):
        seen["m"], seen["t"] = mask_logits, trunk
        return orig_gate(mask_logits, trunk)

    m.gate = spy
    with torch.no_grad():
        m(x)
        expected = (1 + torch.sigmoid(seen["m"])) * seen["t"]
        torch.testing.assert_close(orig_gate(seen["m"], seen["t"]), expected)


def test_residual_attention_bad_args():
    with pytest.raises(ValueError, match="encoder_depth"):
        ResidualAttentionModule(8, encoder_depth=4)
    with pytest.raises(ValueError, match="8 channels"):
        ResidualAttentionModule(8)(torch.randn(1, 4, 8, 8))
