"""Validation metrics over a whole epoch, and the attention localization score."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def binary_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """AUC and average precision over every validation image (not one batch), plus accuracy at 0.5."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = {"acc": float(((probs >= 0.5).astype(int) == targets).mean())}
    if len(np.unique(targets)) < 2:  # undefined with one class: say so instead of inventing a number
        out["auc"] = out["ap"] = math.nan
    else:
        out["auc"] = float(roc_auc_score(targets, probs))
        out["ap"] = float(average_precision_score(targets, probs))
    return out


def multiclass_metrics(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> dict:
    out = {"acc": float((preds == targets).mean())}
    for c in range(num_classes):
        sel = targets == c
        out[f"acc_class{c}"] = float((preds[sel] == c).mean()) if sel.any() else math.nan
    return out


def attention_mass_inside(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, the share of attention mass inside the mask.

    ``attn`` (B, 1, h, w) non-negative attention at feature resolution; ``mask`` (B, 1, H, W) in [0, 1].
    The map is upsampled bilinearly to the mask's size (as the overlays show it) and renormalized.
    """
    a = F.interpolate(attn.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False).clamp_min(0)
    a = a.flatten(1)
    total = a.sum(1).clamp_min(1e-12)
    return (a * (mask.float().flatten(1) > 0.5)).sum(1) / total


def mask_area(mask: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of pixels inside the mask: the localization score of uniform attention."""
    return (mask.float().flatten(1) > 0.5).float().mean(1)
