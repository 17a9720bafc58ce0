"""Models built from attnfast's attention modules."""
from .attnvgg import AttnVGG
from .ran import ResidualAttentionNet, ran56, ran92

__all__ = ["AttnVGG", "ResidualAttentionNet", "ran56", "ran92"]
