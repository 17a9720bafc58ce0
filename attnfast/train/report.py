"""The lines ``attnfast train`` logs: the run's header, one line per epoch, the closing summary."""
from __future__ import annotations


def header(cfg, info, n_train: int, n_val: int, device, world: int) -> str:
    return (f"attnfast train: {cfg.model} ({cfg.attention} attention) on {cfg.data} "
            f"[{n_train} train / {n_val} val, {info.num_classes} classes], {cfg.image_size}px, "
            f"batch {cfg.batch_size}, {cfg.epochs} epochs, device {device}{f' x{world}' if world > 1 else ''}, "
            f"out {cfg.out}")


def overlay_note(model_name: str, names: list, count: int) -> str:
    """What each epoch's overlay picture shows, or that the model has none."""
    if count == 0:
        return "overlays: off (--overlay-count 0)"
    if not names:
        return (f"overlays: none; {model_name} has no attention map attnfast can draw (grid attention, residual "
                "attention masks, CBAM spatial gates and SAGAN self-attention have one)")
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"
    return f"overlays/epoch_NNN.png: {len(names)} attention map(s) ({shown})"


def epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}", f"val loss {row['val_loss']:.4f}"]
    for k in ("val_auc", "val_ap", "val_acc"):
        if k in row:
            parts.append(f"{k[4:]} {row[k]:.4f}")
    locs = [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("loc_") and not k.startswith("loc_uniform")]
    if locs:
        parts.append("loc " + " ".join(locs))
    parts.append(f"{row['epoch_time_s']:.0f}s ({row['epoch_cpu_s']:.0f} CPU-s)")
    return " | ".join(parts)


def localization_line(final: dict) -> str | None:
    locs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in final.items()
                     if k.startswith("loc_") and not k.startswith("loc_uniform"))
    if not locs:
        return None
    return (f"attention localization (share of attention mass inside the lesion mask): {locs} "
            f"(uniform attention would score {final['loc_uniform']:.3f}"
            + (f", {final['loc_uniform_malignant']:.3f} on malignant" if "loc_uniform_malignant" in final else "")
            + ")")


def done_line(summary: dict, metric: str, out: str) -> str:
    return (f"done in {summary['train_time_s']:.0f}s ({summary['train_cpu_s']:.0f} CPU-s); best {metric[4:]} "
            f"{summary['best_' + metric]:.4f} at epoch {summary['best_epoch']}; outputs in {out}")


__all__ = ["header", "overlay_note", "epoch_line", "localization_line", "done_line"]
