"""Attention maps of a model's forward pass and the seed-style overlay picture.

AttnVGG returns ``(logits, a1, a2)``: a1 is the pool-3 attention, a2 the pool-4 one. Models that return
logits only are looked into with forward hooks: every module with a ``mask_head`` (the residual attention
modules) contributes the channel mean of its soft mask ``sigmoid(mask_logits)``.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

VGG_MAP_NAMES = ("pool-3 attention", "pool-4 attention")


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


@contextlib.contextmanager
def _mask_hooks(model, store: list):
    handles = []
    for name, mod in _unwrap(model).named_modules():
        head = getattr(mod, "mask_head", None)
        if isinstance(head, torch.nn.Module):
            def hook(_m, _inp, out, name=name):
                store.append((f"{name} mask", torch.sigmoid(out.float()).mean(1, keepdim=True).detach()))
            handles.append(head.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def split_output(out):
    """``(logits, extras)`` of a model's output: AttnVGG's ``(logits, a1, a2)`` or plain logits."""
    if isinstance(out, (tuple, list)):
        return out[0], list(out[1:])
    return out, []


def forward_with_maps(model, x: torch.Tensor, want_maps: bool = True):
    """``(logits, [(name, map (B, 1, h, w)), ...])``."""
    hooked: list = []
    ctx = _mask_hooks(model, hooked) if want_maps else contextlib.nullcontext()
    with ctx:
        logits, extra = split_output(model(x))
    if extra:
        names = VGG_MAP_NAMES if len(extra) == 2 else [f"attention {i + 1}" for i in range(len(extra))]
        maps = [(n, a.detach()) for n, a in zip(names, extra) if isinstance(a, torch.Tensor) and a.dim() == 4]
        return logits, maps
    return logits, hooked


def _jet(a: np.ndarray) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps["jet"](a)[..., :3]


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo = t.amin(dim=(-2, -1), keepdim=True)
    hi = t.amax(dim=(-2, -1), keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def overlay_rows(images: torch.Tensor, maps: list, mean, std) -> list:
    """Rows of the picture as HxWx3 float arrays: the inputs, then each attention map blended on them."""
    x = images.detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    x = x.clamp(0, 1)
    size = x.shape[-2:]
    img_row = torch.cat(list(x), dim=2).permute(1, 2, 0).numpy()
    rows = [("input images", img_row)]
    for name, a in maps:
        up = F.interpolate(a.detach().float().cpu()[: x.shape[0]], size=size, mode="bilinear", align_corners=False)
        heat = _jet(torch.cat(list(_minmax(up)[:, 0]), dim=1).numpy())
        rows.append((name, 0.6 * img_row + 0.4 * heat))
    return rows


def overlay_png(images, maps, mean, std, title: str = "") -> bytes:
    """PNG bytes of the seed's picture: input row, then one row per attention map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = overlay_rows(images, maps, mean, std)
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.6 * n, 1.9 * len(rows) + 0.4), squeeze=False)
    for ax, (name, arr) in zip(axes[:, 0], rows):
        ax.imshow(np.clip(arr, 0, 1), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
