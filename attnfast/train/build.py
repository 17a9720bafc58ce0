"""What a run is built from: the data (``--data``), the model, the optimizer and schedule, the device."""
from __future__ import annotations

import torch

from ..data import ensure_synthetic, parse_spec, read_layout
from . import distributed as dist_utils
from .checkpoint import read_checkpoint
from .config import DEVICE_HELP, DEVICE_SPEC, ConfigError, TrainConfig


def load_data_info(spec: str, cfg: TrainConfig | None = None, *, test: bool = False, rank: int = 0):
    """Resolve ``--data`` to a :class:`DatasetInfo` (generating the synthetic set once if needed)."""
    kind, path = parse_spec(spec)
    if kind.startswith("synthetic"):
        sub = "cassava" if kind == "synthetic-cassava" else "melanoma"
        n = cfg.synthetic_n if cfg else TrainConfig.synthetic_n
        size = cfg.synthetic_size if cfg else TrainConfig.synthetic_size
        root = ensure_synthetic(sub, n=n, size=size, root=path) if rank == 0 else None
        dist_utils.barrier()  # rank 0 generated it; the others find it in place
        if root is None:
            root = ensure_synthetic(sub, n=n, size=size, root=path)
        return read_layout(sub, root)
    return read_layout(kind, path, test=test)


def model_kwargs(cfg: TrainConfig) -> dict:
    if cfg.is_timm:
        return {"drop_rate": cfg.dropout} if cfg.dropout else {}
    if cfg.model == "attnvgg":
        return {"width_mult": cfg.width_mult, "pretrained": cfg.pretrained, "dropout": cfg.dropout,
                "normalize_attn": cfg.normalize_attn}
    if cfg.model.startswith("ran"):
        return {"width": max(4, int(round(64 * cfg.width_mult))), "dropout": cfg.dropout}
    return {"width": max(4, int(round(32 * cfg.width_mult)))}  # sagan_resnet: 32 channels at width 1


def build_model(name: str, num_outputs: int, attention: str, kwargs: dict, report: list | None = None):
    """:func:`attnfast.models.create_model`; a timm model built with fused attention appends what
    ``attnfast.swap`` replaced to ``report``."""
    from ..models import create_model

    return create_model(name, num_outputs, attention=attention, report=report, **kwargs)


def build_from_checkpoint(meta: dict, attention: str | None = None, report: list | None = None):
    """The checkpoint's architecture with ``pretrained=False``: the checkpoint holds every weight, so the
    ImageNet file in the hub cache (which a training run may have started from) is not needed."""
    kwargs = dict(meta["model_kwargs"])
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False
    return build_model(meta["model"], meta["num_outputs"], attention or meta["attention"], kwargs, report)


def load_weights(model, state: dict, path: str, option: str) -> None:
    """``model.load_state_dict(state)``, a :class:`ConfigError` line when the weights do not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = " ".join(str(e).split())[:300]
        raise ConfigError(f"{option} {path}: its weights do not fit the model it describes ({first})") from None


def load_model(path: str, attention: str | None = None, device="cpu"):
    """The model saved in an attnfast checkpoint (``best.pt`` or ``last.pt``), in eval mode on ``device``.

    Reads the file with ``weights_only=True`` (no code in it runs), rebuilds the architecture from the config
    stored in it (``pretrained=False``: every weight comes from the file) and loads the weights. ``attention``:
    ``'fused'`` or ``'reference'`` (default: as trained). Bad files raise :class:`ConfigError`.
    """
    ck = read_checkpoint(path, "load_model")
    try:
        model = build_from_checkpoint(ck["meta"], attention)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"load_model {path}: its 'meta' entry does not describe a model ({e!r})") from None
    load_weights(model, ck["model"], path, "load_model")
    return model.to(device).eval()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``--device`` as a :class:`torch.device` with an index for CUDA; a :class:`ConfigError` line for a
    device that is not ``auto``/``cpu``/``cuda``/``cuda:N`` or a GPU that is not there."""
    if not isinstance(spec, str) or DEVICE_SPEC.match(spec) is None:
        raise ConfigError(f"--device must be {DEVICE_HELP}; got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is "
                          "False); use --device cpu")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else (local_rank if dist_utils.active() else
                                                         torch.cuda.current_device())
    if index >= count:
        raise ConfigError(f"--device {spec}: there is no GPU {index} ({count} visible)")
    return torch.device("cuda", index)


def amp_dtype(mode: str, device: torch.device):
    if mode == "auto":  # bf16 on a GPU that supports it; off on CPU
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, opt):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None


__all__ = ["load_data_info", "model_kwargs", "build_model", "build_from_checkpoint", "load_weights", "load_model",
           "resolve_device", "amp_dtype", "make_optimizer", "make_scheduler"]
