"""AttnVGG ("Learn to Pay Attention" / AttnMel, seeds 000-002) on a torchvision vgg16_bn backbone.

The backbone is vgg16_bn's ``features`` cut into its five conv blocks at the max-pools (indices
6, 13, 23, 33, 43 of the layer list); the pools are applied explicitly. Grid attention runs on
pool-3 and pool-4, guided by pool-5. The global feature uses adaptive average pooling, so any
input whose sides are multiples of 32 works, including the dataset's native 512x512 (the seed's
``AvgPool2d(7)`` + ``view`` only works at 224).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_tensor
from ._select import attention_class

POOL_INDICES = (6, 13, 23, 33, 43)
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_bn_weights_path() -> str:
    """Where torch hub caches the torchvision ImageNet vgg16_bn weights."""
    from torchvision.models import VGG16_BN_Weights

    filename = os.path.basename(VGG16_BN_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _vgg16_bn_features(width_mult: float, pretrained: bool) -> nn.Sequential:
    from torchvision.models import vgg16_bn
    from torchvision.models.vgg import make_layers

    if pretrained:
        if width_mult != 1.0:
            raise ValueError("pretrained=True needs width_mult=1.0 (ImageNet weights are full width)")
        path = vgg16_bn_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained=True: ImageNet vgg16_bn weights not found at {path}. attnfast never downloads; "
                "copy the file there (torch hub cache, $TORCH_HOME) or use pretrained=False.")
        net = vgg16_bn(weights=None)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.features
    if width_mult == 1.0:
        return vgg16_bn(weights=None).features
    cfg = [v if v == "M" else max(8, int(round(v * width_mult))) for v in VGG16_CFG]
    return make_layers(cfg, batch_norm=True)


class AttnVGG(nn.Module):
    """VGG16-BN with two grid-attention blocks; ``forward(x) -> (logits, a1, a2)``.

    Args:
        num_classes: outputs of the classifier (1 for the binary melanoma task with focal loss).
        normalize_attn: softmax attention with sum pooling (True) or sigmoid with average pooling.
        dropout: dropout on the concatenated feature, or None.
        pretrained: load torchvision's ImageNet vgg16_bn weights from the torch hub cache (offline).
        attention: ``'reference'`` (plain PyTorch) or ``'fused'`` (Triton kernels).
        width_mult: scale every channel count (1.0 is the real VGG16; smaller for CPU experiments).
    """

    def __init__(self, num_classes: int, normalize_attn: bool = False, dropout: float | None = None,
                 pretrained: bool = False, attention: str = "reference", width_mult: float = 1.0):
        super().__init__()
        features = list(_vgg16_bn_features(width_mult, pretrained).children())
        pools = tuple(i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d))
        if pools != POOL_INDICES:  # the slicing below depends on it
            raise RuntimeError(f"unexpected vgg16_bn layout: max-pools at {pools}, expected {POOL_INDICES}")
        self.conv_block1 = nn.Sequential(*features[0:6])
        self.conv_block2 = nn.Sequential(*features[7:13])
        self.conv_block3 = nn.Sequential(*features[14:23])
        self.conv_block4 = nn.Sequential(*features[24:33])
        self.conv_block5 = nn.Sequential(*features[34:43])
        c3 = self.conv_block3[-2].num_features
        c4 = self.conv_block4[-2].num_features
        c5 = self.conv_block5[-2].num_features
        self.channels = (c3, c4, c5)
        self.attention = attention
        self.normalize_attn = normalize_attn
        self.dpt = nn.Dropout(dropout) if dropout is not None else None
        self.cls = nn.Linear(c5 + c4 + c3, num_classes, bias=True)
        Attn = attention_class(attention, "GridAttention")
        self.attn1 = Attn(c3, c5, c3, 4, normalize_attn=normalize_attn)
        self.attn2 = Attn(c4, c5, c3, 2, normalize_attn=normalize_attn)
        self.reset_parameters(self.cls)
        self.reset_parameters(self.attn1)
        self.reset_parameters(self.attn2)

    @staticmethod
    def reset_parameters(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.constant_(m.bias, 0.0)

    def forward(self, x: torch.Tensor):
        check_tensor(x, "x", ndim=4, channels=3)
        h, w = x.shape[-2:]
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise ValueError(f"AttnVGG input sides must be positive multiples of 32 (five 2x pools); "
                             f"got {h}x{w}")
        block1 = self.conv_block1(x)
        pool1 = F.max_pool2d(block1, 2, 2)  # /2
        block2 = self.conv_block2(pool1)
        pool2 = F.max_pool2d(block2, 2, 2)  # /4
        block3 = self.conv_block3(pool2)
        pool3 = F.max_pool2d(block3, 2, 2)  # /8
        block4 = self.conv_block4(pool3)
        pool4 = F.max_pool2d(block4, 2, 2)  # /16
        block5 = self.conv_block5(pool4)
        pool5 = F.max_pool2d(block5, 2, 2)  # /32
        g = F.adaptive_avg_pool2d(pool5, 1).flatten(1)
        a1, g1 = self.attn1(pool3, pool5)
        a2, g2 = self.attn2(pool4, pool5)
        g_hat = torch.cat((g, g1, g2), dim=1)
        if self.dpt is not None:
            g_hat = self.dpt(g_hat)
        return self.cls(g_hat), a1, a2


def build(num_classes: int, attention: str = "fused", **kwargs) -> AttnVGG:
    """Factory for ``create_model('attnvgg', ...)``; softmax attention by default (AttnMel)."""
    kwargs.setdefault("normalize_attn", True)
    return AttnVGG(num_classes, attention=attention, **kwargs)
