"""Attention maps of a model's forward pass and the seed-style overlay picture.

Two kinds of map:

- **Saliency maps**, one per image, scored for localization against the lesion masks and drawn in the overlays:
  AttnVGG's ``(logits, a1, a2)`` (a1 the pool-3 attention, a2 the pool-4 one), and the soft mask
  ``sigmoid(mask_logits)`` (channel mean) of every module with a ``mask_head`` (the residual attention modules),
  read with forward hooks.
- **Views**, drawn in the overlays only: the spatial gate ``sigmoid(conv([mean_c x, max_c x]))`` of every CBAM
  module (timm's ``CbamModule``/``LightCbamModule``, attnfast's ``CBAM``/``LightCBAM``), recomputed in eager
  PyTorch from the module's input and its own weights; and, for SAGAN self-attention layers, the attention row
  of two query pixels (the centre and the centre of the top-left quarter), through
  :func:`attnfast.nn.self_attention.attention_maps` (only those rows are computed, never the N x N matrix).

A model with neither (a plain timm ResNet) has no overlay.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

VGG_MAP_NAMES = ("pool-3 attention", "pool-4 attention")
OVERLAY_ROWS = 3  # attention rows drawn under the input row (evenly spaced over the model's maps)


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _is_cbam(mod) -> bool:
    spatial = getattr(mod, "spatial", None)
    return isinstance(getattr(mod, "channel", None), torch.nn.Module) and isinstance(
        getattr(spatial, "conv", None), torch.nn.Module)


def _is_self_attention(mod) -> bool:
    return all(isinstance(getattr(mod, n, None), torch.nn.Module) for n in ("query_conv", "key_conv"))


@contextlib.contextmanager
def _hooks(model, masks: list, inputs: list | None):
    """Forward hooks: residual-attention soft masks into ``masks``; with ``inputs``, the input of every CBAM and
    self-attention module as ``(name, module, x)``."""
    handles = []
    for name, mod in _unwrap(model).named_modules():
        head = getattr(mod, "mask_head", None)
        if isinstance(head, torch.nn.Module):
            def hook(_m, _inp, out, name=name):
                masks.append((f"{name} mask", torch.sigmoid(out.float()).mean(1, keepdim=True).detach()))
            handles.append(head.register_forward_hook(hook))
        if inputs is not None and (_is_cbam(mod) or _is_self_attention(mod)):
            def pre(m, args, name=name):
                inputs.append((name, m, args[0].detach()))
            handles.append(mod.register_forward_pre_hook(pre))
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


def forward_with_maps(model, x: torch.Tensor, want_maps: bool = True, views: bool = False):
    """``(logits, [(name, map (B, 1, h, w)), ...])``: the saliency maps, and with ``views`` also the CBAM spatial
    gates and SAGAN query rows (see the module docstring)."""
    hooked: list = []
    inputs: list | None = [] if views else None
    ctx = _hooks(model, hooked, inputs) if want_maps else contextlib.nullcontext()
    with ctx:
        logits, extra = split_output(model(x))
    if extra:
        names = VGG_MAP_NAMES if len(extra) == 2 else [f"attention {i + 1}" for i in range(len(extra))]
        maps = [(n, a.detach()) for n, a in zip(names, extra) if isinstance(a, torch.Tensor) and a.dim() == 4]
    else:
        maps = hooked
    for name, mod, inp in inputs or []:
        maps += _cbam_gate(name, mod, inp) if _is_cbam(mod) else _query_rows(name, mod, inp)
    return logits, maps


@torch.no_grad()
def _cbam_gate(name: str, mod, x: torch.Tensor) -> list:
    """The spatial gate of a CBAM module on input ``x``: its spatial branch's conv output, through a sigmoid."""
    out: list = []
    h = mod.spatial.conv.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        mod.spatial(mod.channel(x))  # eager, with the module's weights (a fused module keeps them in these too)
    finally:
        h.remove()
    return [(f"{name} spatial gate", torch.sigmoid(out[-1].float()).detach())]


@torch.no_grad()
def _query_rows(name: str, layer, x: torch.Tensor) -> list:
    from ..nn.self_attention import attention_maps

    h, w = x.shape[-2:]
    queries = [(h // 2, w // 2), (h // 4, w // 4)]
    rows = attention_maps(layer, x, queries)  # (B, Q, Hk, Wk), or (B, heads, Q, Hk, Wk)
    if rows.dim() == 5:
        rows = rows.float().mean(1)
    return [(f"{name} attention of pixel {q}", rows[:, i:i + 1].float()) for i, q in enumerate(queries)]


def pick_rows(maps: list, k: int = OVERLAY_ROWS) -> list:
    """At most ``k`` of ``maps``, evenly spaced from the first to the last."""
    if len(maps) <= k:
        return list(maps)
    return [maps[round(i * (len(maps) - 1) / (k - 1))] for i in range(k)]


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


@torch.no_grad()
def epoch_overlay(model, dataset, count: int, device, autocast, title: str, mean, std):
    """PNG bytes of the first ``count`` images of ``dataset`` with the model's maps, or ``None`` without maps."""
    n = min(count, len(dataset))
    if n == 0:
        return None
    x = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    model.eval()
    with autocast():
        _, maps = forward_with_maps(model, x, views=True)
    if not maps:
        return None
    return overlay_png(x, pick_rows(maps), mean, std, title=title)


@torch.no_grad()
def map_names(model, x: torch.Tensor) -> tuple:
    """``(saliency map names, every overlay map name)`` of ``model`` on the sample batch ``x`` (run in eval mode;
    the model's train/eval mode is left as it was)."""
    was_training = model.training
    model.eval()
    try:
        _, saliency = forward_with_maps(model, x)
        _, every = forward_with_maps(model, x, views=True)
    finally:
        model.train(was_training)
    return [n for n, _ in saliency], [n for n, _ in every]
