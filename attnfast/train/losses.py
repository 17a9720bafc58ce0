"""The training losses: the seeds' focal loss for binary tasks, cross-entropy otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

# The seeds' FocalLoss: alpha * (1 - pt)**gamma * BCE with the same alpha for EVERY sample. torchvision's
# alpha weights positives alpha and negatives 1 - alpha, so it is called with alpha=-1 (no class weighting)
# and the constant alpha applied outside.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The seeds' FocalLoss on logits: ``alpha * (1 - pt)**gamma * BCE``, alpha the same for every sample."""
    return FOCAL_ALPHA * sigmoid_focal_loss(logits.float().view(-1), targets.float().view(-1), alpha=-1,
                                            gamma=FOCAL_GAMMA, reduction=reduction)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    """Focal loss for ``task == "binary"`` (one logit), cross-entropy for ``"multiclass"``."""
    if task == "binary":
        return focal_loss(logits, targets, reduction)
    return F.cross_entropy(logits.float(), targets.long(), reduction=reduction)


__all__ = ["FOCAL_ALPHA", "FOCAL_GAMMA", "focal_loss", "compute_loss"]
