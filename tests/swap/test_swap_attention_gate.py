"""Attention U-Net gates: MONAI's ``AttentionUnet`` (every ``AttentionBlock`` swapped) and an Attention-Gated-
Networks-style U-Net whose gates are ``GridAttentionBlock2D`` as AGN writes it (``operation_function``
dispatch, modes 'concatenation' and 'concatenation_softmax'), each swapped with an optimizer built first and
trained next to an unswapped deep copy (swap_checks: outputs, input and parameter gradients, parameters and
BatchNorm statistics after the steps); unswap gives the original objects back; dry_run changes nothing; strict
raises on a gate that cannot be swapped.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnfast.nn.attention_gate import AttentionBlock, GridAttentionBlock2D
from attnfast.swap import SwapWarning, swap, unswap
from seed_modules import randomize
from swap_checks import check_swap_trains_like_oracle


# --- Attention-Gated-Networks' grid_attention_layer.py (_GridAttentionBlockND, dimension 2) ------------------
class AgnGridAttentionBlock2D(nn.Module):
    def __init__(self, in_channels, gating_channels, inter_channels=None, mode='concatenation',
                 sub_sample_factor=(2, 2)):
        super().__init__()
        assert mode in ['concatenation', 'concatenation_debug', 'concatenation_residual', 'concatenation_softmax']
        self.mode = mode
        self.dimension = 2
        self.sub_sample_factor = sub_sample_factor
        self.sub_sample_kernel_size = self.sub_sample_factor
        self.in_channels = in_channels
        self.gating_channels = gating_channels
        self.inter_channels = inter_channels
        if self.inter_channels is None:
            self.inter_channels = in_channels // 2
            if self.inter_channels == 0:
                self.inter_channels = 1
        self.upsample_mode = 'bilinear'
        self.W = nn.Sequential(nn.Conv2d(self.in_channels, self.in_channels, 1, 1, 0),
                               nn.BatchNorm2d(self.in_channels))
        self.theta = nn.Conv2d(self.in_channels, self.inter_channels, kernel_size=self.sub_sample_kernel_size,
                               stride=self.sub_sample_factor, padding=0, bias=False)
        self.phi = nn.Conv2d(self.gating_channels, self.inter_channels, kernel_size=1, stride=1, padding=0,
                             bias=True)
        self.psi = nn.Conv2d(self.inter_channels, 1, kernel_size=1, stride=1, padding=0, bias=True)
        if mode == 'concatenation':
            self.operation_function = self._concatenation
        elif mode == 'concatenation_debug':
            self.operation_function = self._concatenation_debug
        elif mode == 'concatenation_softmax':
            self.operation_function = self._concatenation_softmax

    def forward(self, x, g):
        output = self.operation_function(x, g)
        return output

    def _concatenation(self, x, g):
        input_size = x.size()
        theta_x = self.theta(x)
        theta_x_size = theta_x.size()
        phi_g = F.interpolate(self.phi(g), size=theta_x_size[2:], mode=self.upsample_mode)
        f = F.relu(theta_x + phi_g, inplace=True)
        sigm_psi_f = torch.sigmoid(self.psi(f))
        sigm_psi_f = F.interpolate(sigm_psi_f, size=input_size[2:], mode=self.upsample_mode)
        y = sigm_psi_f.expand_as(x) * x
        W_y = self.W(y)
        return W_y, sigm_psi_f

    def _concatenation_debug(self, x, g):
        input_size = x.size()
        theta_x = self.theta(x)
        phi_g = F.interpolate(self.phi(g), size=theta_x.size()[2:], mode=self.upsample_mode)
        f = F.softplus(theta_x + phi_g)
        sigm_psi_f = torch.sigmoid(self.psi(f))
        sigm_psi_f = F.interpolate(sigm_psi_f, size=input_size[2:], mode=self.upsample_mode)
        return self.W(sigm_psi_f.expand_as(x) * x), sigm_psi_f

    def _concatenation_softmax(self, x, g):
        input_size = x.size()
        batch_size = input_size[0]
        theta_x = self.theta(x)
        theta_x_size = theta_x.size()
        phi_g = F.interpolate(self.phi(g), size=theta_x_size[2:], mode=self.upsample_mode)
        f = F.relu(theta_x + phi_g, inplace=True)
        psi_f = self.psi(f).view(batch_size, 1, -1)
        sm_psi_f = F.softmax(psi_f, dim=2).view(batch_size, 1, *theta_x_size[2:])
        sm_psi_f = F.interpolate(sm_psi_f, size=input_size[2:], mode=self.upsample_mode)
        y = sm_psi_f.expand_as(x) * x
        W_y = self.W(y)
        return W_y, sm_psi_f


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class AgnUNet(nn.Module):
    """AGN's unet_grid_attention_2D, two levels: the gating signal is the coarser level, x the skip."""

    def __init__(self, mode='concatenation', ch=(4, 8, 16)):
        super().__init__()
        self.enc1, self.enc2, self.center = _block(1, ch[0]), _block(ch[0], ch[1]), _block(ch[1], ch[2])
        self.gating = nn.Sequential(nn.Conv2d(ch[2], ch[2], 1), nn.BatchNorm2d(ch[2]), nn.ReLU())
        self.attentionblock2 = AgnGridAttentionBlock2D(ch[1], ch[2], ch[1], mode=mode)
        self.attentionblock1 = AgnGridAttentionBlock2D(ch[0], ch[1], ch[0], mode=mode)
        self.up2, self.up1 = _block(ch[2] + ch[1], ch[1]), _block(ch[1] + ch[0], ch[0])
        self.final = nn.Conv2d(ch[0], 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        c = self.center(F.max_pool2d(e2, 2))
        gating = self.gating(c)
        g2, att2 = self.attentionblock2(e2, gating)
        d2 = self.up2(torch.cat([g2, F.interpolate(c, scale_factor=2, mode='bilinear')], 1))
        g1, att1 = self.attentionblock1(e1, d2)
        d1 = self.up1(torch.cat([g1, F.interpolate(d2, scale_factor=2, mode='bilinear')], 1))
        return self.final(d1), att1, att2


def _monai_unet():
    attentionunet = pytest.importorskip("monai.networks.nets.attentionunet")
    torch.manual_seed(0)
    return attentionunet.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16),
                                       strides=(2, 2))


def test_monai_attention_unet_trains_like_the_original():
    model = _monai_unet()
    randomize(model, scale=0.3)
    x = torch.randn(2, 1, 16, 12)
    result = check_swap_trains_like_oracle(
        model, [x], [("model.1.attention", "AttentionBlock"), ("model.1.submodule.1.attention", "AttentionBlock")])
    assert all(type(m) is AttentionBlock for m in (model.model[1].attention, model.model[1].submodule[1].attention))
    model.eval()
    oracle = copy.deepcopy(model)
    unswap(oracle)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-4, atol=1e-5)
    assert result.skipped == []


def test_monai_unswap_dry_run_and_strict():
    from monai.networks.nets.attentionunet import AttentionBlock as MonaiBlock

    model = _monai_unet()
    blocks = [m for m in model.modules() if isinstance(m, MonaiBlock)]
    params = [id(p) for p in model.parameters()]
    assert [(r.name, r.family) for r in swap(model, dry_run=True)] == [
        ("model.1.attention", "monai_attention"), ("model.1.submodule.1.attention", "monai_attention")]
    assert [m for m in model.modules() if isinstance(m, MonaiBlock)] == blocks  # dry run: nothing changed
    swap(model, strict=True)
    assert not any(isinstance(m, MonaiBlock) for m in model.modules())
    unswap(model)
    assert [m for m in model.modules() if isinstance(m, MonaiBlock)] == blocks
    assert [id(p) for p in model.parameters()] == params
    model.model[1].attention.psi[2] = nn.Hardsigmoid()  # another gate: refused, and strict says so
    with pytest.raises(ValueError, match="psi.2 is Hardsigmoid"):
        swap(model, strict=True)
    assert model.model[1].submodule[1].attention in blocks  # strict changed nothing


@pytest.mark.parametrize("mode, dtype", [("concatenation", torch.float32), ("concatenation_softmax", torch.float64)])
def test_agn_unet_trains_like_the_original(mode, dtype):
    """softmax in float64: its map is ~1/48 here, so W's BatchNorm amplifies the fp32 rounding noise of W.0.bias's
    gradient (exactly 0: a bias before BatchNorm) past the oracle's tolerance in eager fp32 and attnfast alike."""
    torch.manual_seed(0)
    model = AgnUNet(mode).to(dtype)
    randomize(model, scale=0.3)
    x = torch.randn(2, 1, 16, 12, dtype=dtype)
    check_swap_trains_like_oracle(model, [x], [("attentionblock2", "GridAttentionBlock2D"),
                                               ("attentionblock1", "GridAttentionBlock2D")])
    assert type(model.attentionblock1) is GridAttentionBlock2D
    unswap(model)
    assert type(model.attentionblock1) is AgnGridAttentionBlock2D


def test_agn_other_modes_are_reported():
    torch.manual_seed(0)
    model = AgnUNet()
    model.attentionblock1 = AgnGridAttentionBlock2D(4, 8, 4, mode='concatenation_debug')
    with pytest.warns(SwapWarning, match="concatenation_debug"):
        result = swap(model)
    assert [r.name for r in result] == ["attentionblock2"]
    assert [(s.name, s.status, s.family) for s in result.skipped] == [
        ("attentionblock1", "no fused op", "agn_grid")]


def test_family_on_the_triton_path(triton_backend):
    """The swapped MONAI network on the kernels (interpreted here): same outputs and gradients."""
    model = _monai_unet()
    randomize(model, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SwapWarning)
        check_swap_trains_like_oracle(model, [torch.randn(2, 1, 8, 8)],
                                      [("model.1.attention", "AttentionBlock"),
                                       ("model.1.submodule.1.attention", "AttentionBlock")], steps=1)
