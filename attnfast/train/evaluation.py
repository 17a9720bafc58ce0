"""Whole-epoch validation: every image's prediction (gathered across DDP ranks), the metrics and the
localization scores of the model's saliency maps."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import distributed as dist_utils
from .losses import compute_loss
from .metrics import attention_mass_inside, binary_metrics, mask_area, multiclass_metrics
from .progress import bar as progress_bar
from .visualize import forward_with_maps


@contextlib.contextmanager
def batches(loader):
    """``iter(loader)``, whose worker processes are stopped when the block ends, also on an error.

    An exception raised in a worker (a corrupt image) is re-raised here inside a reference cycle that holds
    the iterator; left to the garbage collector, its workers would be stopped whenever that runs, after the
    queues they wait on are gone: 5 s per worker (``MP_STATUS_CHECK_INTERVAL``) before they are killed.
    """
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # only the multi-process iterator has workers
        if shutdown is not None:
            shutdown()


def slug(name: str) -> str:
    """A map name as a metrics column suffix (``"pool-3 attention"`` -> ``pool_3``)."""
    return "".join(c if c.isalnum() else "_" for c in name.replace(" attention", "").replace(" mask", "")).strip("_")


@torch.no_grad()
def evaluate(model, loader, sampler, task: str, num_outputs: int, device, autocast, map_names: list,
             progress: bool = False) -> dict:
    """``val_loss``, ``val_count`` and the task's metrics over the whole validation set (``val_auc``/``val_ap``
    or ``val_acc`` and per-class accuracy), plus ``loc_<map>`` localization scores when the set has masks."""
    model.eval()
    order = list(iter(sampler)) if sampler is not None else list(range(len(loader.dataset)))
    idx_all, scores, targets, losses, locs = [], [], [], [], []
    pos = 0
    with batches(loader) as it:
        for batch in progress_bar(it, "validate", enabled=progress, total=len(loader)):
            x, y = batch[0].to(device), batch[1].to(device)
            with autocast():
                logits, maps = forward_with_maps(model, x, want_maps=len(batch) > 2)
            logits = logits.float()
            n = x.shape[0]
            idx_all += order[pos:pos + n]
            pos += n
            if task == "binary":
                scores.append(torch.sigmoid(logits.view(-1)).cpu())
            else:
                scores.append(logits.argmax(1).cpu())
            losses.append(compute_loss(logits, y, task, reduction="none").cpu())
            targets.append(y.cpu())
            if len(batch) > 2:
                mask = batch[2].to(device)
                row = [mask_area(mask).cpu()] + [attention_mass_inside(a, mask).cpu() for _, a in maps]
                locs.append(torch.stack(row, 1))
    local = {"idx": idx_all, "score": torch.cat(scores).tolist(), "target": torch.cat(targets).tolist(),
             "loss": torch.cat(losses).tolist(), "loc": torch.cat(locs).tolist() if locs else []}
    rows = _gather(local)
    score = np.array([r[0] for r in rows])
    target = np.array([r[1] for r in rows]).astype(int)
    res = {"val_loss": float(np.mean([r[2] for r in rows])), "val_count": len(rows)}
    if task == "binary":
        res.update({f"val_{k}": v for k, v in binary_metrics(score, target).items()})
    else:
        res.update({f"val_{k}": v for k, v in multiclass_metrics(score.astype(int), target, num_outputs).items()})
    if rows and rows[0][3] is not None:
        res.update(_localization(np.array([r[3] for r in rows]), target, task, map_names))
    return res


def _gather(local: dict) -> list:
    """Every rank's ``(score, target, loss, loc)`` rows, each validation image once (DistributedSampler pads
    the last ranks with repeats)."""
    seen, rows = set(), []
    for part in dist_utils.all_gather_object(local):
        for k, i in enumerate(part["idx"]):
            if i in seen:
                continue
            seen.add(i)
            rows.append((part["score"][k], part["target"][k], part["loss"][k], part["loc"][k] if part["loc"] else None))
    return rows


def _localization(loc: np.ndarray, target: np.ndarray, task: str, map_names: list) -> dict:
    """Column 0 is the mask area (uniform attention's score); then one column per saliency map."""
    res = {"loc_uniform": float(loc[:, 0].mean())}
    names = map_names or [f"map{i}" for i in range(loc.shape[1] - 1)]
    pos = target == 1  # binary: the malignant images, where the lesion is the evidence
    if task == "binary" and pos.any():
        res["loc_uniform_malignant"] = float(loc[pos, 0].mean())
    for j, name in enumerate(names):
        res[f"loc_{slug(name)}"] = float(loc[:, j + 1].mean())
        if task == "binary" and pos.any():
            res[f"loc_{slug(name)}_malignant"] = float(loc[pos, j + 1].mean())
    return res


__all__ = ["evaluate", "batches", "slug"]
