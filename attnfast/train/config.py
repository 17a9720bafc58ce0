"""Training configuration: the seeds' choices as defaults, plus the main job's CPU-sized defaults.

:class:`TrainConfig` is the one declaration of every ``attnfast train`` option: each field's metadata holds its
command-line help (and, for the two inverted flags, the flag's name), and ``attnfast.cli`` builds the parser
from the fields. A field's ``--option`` is its name with dashes (:func:`option_name`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

from ..models import MODEL_BUILDERS
from .errors import ConfigError

MODELS = tuple(MODEL_BUILDERS)  # attnfast's own; any other --model names a timm model
ATTENTIONS = ("fused", "reference")
AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
SEED_MAX = 2 ** 32 - 1  # NumPy's and scikit-learn's seeds are 32-bit
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_HELP = "auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda (the current GPU) or cuda:N"

# The main job (``attnfast train`` with no arguments): synthetic lesions, AttnVGG at 1/8 width,
# 64 px, sized to finish in a few minutes on 2 CPU cores.
SYNTHETIC_DEFAULTS = {"image_size": 64, "width_mult": 0.125, "epochs": 4, "batch_size": 32}
REAL_DEFAULTS = {"image_size": 224, "width_mult": 1.0, "epochs": 2, "batch_size": 100}


def _opt(default, help: str, **meta):
    """A field with its command-line help; ``flag``/``invert``: a bool shown as an inverted ``--flag``;
    ``choices``: the values argparse accepts."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class TrainConfig:
    data: str = _opt("synthetic", "synthetic | synthetic-cassava | melanoma:DIR | cassava:DIR | folder:DIR")
    model: str = _opt("attnvgg", f"{' | '.join(MODELS)}, or a timm model (needs timm): ARCH-cbam / ARCH-lcbam = "
                                 "timm's ARCH with CBAM in every block (e.g. resnet50-cbam), or any timm ARCH as "
                                 "timm builds it")
    image_size: int | None = _opt(None, "resize + centre-crop side in pixels, a multiple of 32 (default 64 on "
                                        "synthetic data, 224 otherwise)")
    epochs: int | None = _opt(None, "epochs to train (default 4 on synthetic data, 2 otherwise: the seed's); with "
                                    "--resume, the total to reach")
    batch_size: int | None = _opt(None, "images per step (default 32 on synthetic data, 100 otherwise: the seed's)")
    out: str | None = _opt(None, "run folder (default runs/<model>-<data>-<time>); it must not hold another run's "
                                 "files (last.pt, best.pt, metrics.csv, summary.json, overlays/) unless --resume")
    attention: str = _opt("fused", "fused: attnfast's fused modules (timm models: put in by attnfast.swap, which "
                                   "reports what it replaced); reference: plain PyTorch (timm models: timm's own "
                                   "modules)", choices=ATTENTIONS)
    amp: str = _opt("auto", "mixed precision; auto: bf16 on a GPU that supports it, off on the CPU",
                    choices=AMP_MODES)
    compile: bool = _opt(False, "torch.compile the model")
    resume: bool = _opt(False, "continue the run in --out from its last.pt (same data and options; only "
                               "--epochs, --device, --workers, --amp, --compile, --overlay-count and progress "
                               "may change)")
    optimizer: str = _opt("adam", "optimizer (adam is the seed's)", choices=OPTIMIZERS)
    lr: float = _opt(1e-4, "learning rate, a positive finite number (1e-4 is the seed's)")
    weight_decay: float = _opt(0.0, "weight decay, 0 or more")
    momentum: float = _opt(0.9, "momentum in [0, 1); --optimizer sgd only")
    scheduler: str = _opt("none", "learning-rate schedule: none, cosine (annealed to 0 over --epochs) or step "
                                  "(x0.1 every epochs/3)", choices=SCHEDULERS)
    seed: int = _opt(0, f"seed of the initial weights, the augmentation and the batch order, 0 to {SEED_MAX}")
    workers: int | None = _opt(None, "DataLoader worker processes, 0 or more (default 0 on the CPU, 4 on a GPU)")
    width_mult: float | None = _opt(None, "channel multiplier of attnfast's models (default 0.125 on synthetic data, "
                                          "1.0 otherwise; RAN stem = 64*W, SAGAN = 32*W)")
    pretrained: bool = _opt(False, "AttnVGG: ImageNet vgg16_bn weights from the torch hub cache (never downloaded)")
    dropout: float | None = _opt(None, "dropout probability in [0, 1) (default: no dropout)")
    normalize_attn: bool = _opt(True, "AttnVGG: sigmoid attention + average pooling instead of softmax + sum",
                                flag="--sigmoid-attn")
    max_benign: int | None = _opt(6000, "melanoma: keep at most N benign images, the seed's balancing (0: all)")
    val_fraction: float = _opt(0.2, "share of every class held out for validation, in (0, 1) (stratified split)")
    split_seed: int = _opt(1234, "seed of the stratified train/validation split (1234 is the seed's), "
                                 f"0 to {SEED_MAX}")
    synthetic_n: int = _opt(2000, "images in the synthetic set (at least 20; synthetic-cassava at --val-fraction "
                                  "0.2: 25)")
    synthetic_size: int = _opt(128, "side of the synthetic images in pixels (at least 32)")
    overlay_count: int = _opt(8, "validation images in each epoch's attention overlay picture (0: no pictures)")
    progress: bool = _opt(True, "no progress bars (they are drawn only on a terminal anyway)", flag="--no-progress")
    device: str = _opt("auto", DEVICE_HELP)

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in, validated."""
        c = dataclasses.replace(self)
        if c.resume and c.out is None:
            raise ConfigError("--resume needs --out: the folder of the run to continue")
        base = SYNTHETIC_DEFAULTS if c.data.startswith("synthetic") else REAL_DEFAULTS
        for key, value in base.items():
            if key == "width_mult" and c.is_timm:
                continue
            if getattr(c, key) is None:
                setattr(c, key, value)
        if c.out is None:
            tag = c.data.split(":")[0]
            c.out = os.path.join("runs", f"{c.model}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
        c.validate()
        return c

    @property
    def is_timm(self) -> bool:
        """Whether ``model`` names a timm model (anything that is not one of attnfast's :data:`MODELS`)."""
        return self.model not in MODELS

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        def finite(x):
            return isinstance(x, (int, float)) and math.isfinite(x)

        if self.is_timm:
            self._validate_timm()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                value = getattr(self, f.name)
                need(value in choices, f"{option_name(f.name)} must be one of {', '.join(choices)}; got {value!r}")
        need(self.epochs >= 1, f"--epochs must be at least 1; got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}")
        need(finite(self.lr) and self.lr > 0, f"--lr must be a positive finite number; got {self.lr}")
        need(finite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be 0 or more; got {self.weight_decay}")
        need(finite(self.momentum) and 0 <= self.momentum < 1, f"--momentum must be in [0, 1); got {self.momentum}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            need(0 <= value <= SEED_MAX, f"{option_name(name)} must be in 0..{SEED_MAX}; got {value}")
        need(0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        low = 64 if self.model.startswith("ran") else 32
        need(self.image_size >= low and self.image_size % 32 == 0,
             f"--image-size must be a multiple of 32 and at least {low} for {self.model} "
             f"(five 2x downsamplings); got {self.image_size}")
        if not self.is_timm:
            need(finite(self.width_mult) and self.width_mult > 0,
                 f"--width-mult must be a positive finite number; got {self.width_mult}")
            need(not (self.pretrained and self.width_mult != 1.0), "--pretrained needs --width-mult 1.0")
        need(self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}")
        need(self.workers is None or self.workers >= 0, f"--workers must be 0 or more; got {self.workers}")
        need(self.overlay_count >= 0, f"--overlay-count must be 0 or more; got {self.overlay_count}")
        need(self.max_benign is None or self.max_benign >= 0,
             f"--max-benign must be 0 (keep all) or more; got {self.max_benign}")
        need(isinstance(self.device, str) and DEVICE_SPEC.match(self.device) is not None,
             f"--device must be {DEVICE_HELP}; got {self.device!r}")
        need(self.synthetic_size >= SYNTHETIC_MIN_SIZE,
             f"--synthetic-size must be at least {SYNTHETIC_MIN_SIZE} pixels; got {self.synthetic_size}")
        if self.data.startswith("synthetic"):
            low = synthetic_min_n(self.data, self.val_fraction)
            need(self.synthetic_n >= low,
                 f"--synthetic-n must be at least {low} for --data {self.data} with --val-fraction "
                 f"{self.val_fraction} (every class needs images in both splits); got {self.synthetic_n}")

    def _validate_timm(self) -> None:
        """A timm --model: known to timm (checked before any data is read), and no attnfast-only option."""
        from ..models import timm_models

        try:
            timm_models.check_name(self.model)
        except ImportError as e:
            raise ConfigError(f"--model {self.model} is a timm model, but {e}") from None
        except ValueError as e:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)} or a timm model name (ARCH, or "
                              f"ARCH-cbam / ARCH-lcbam for CBAM in every block, e.g. resnet50-cbam); "
                              f"{self.model!r}: {e}") from None
        if self.width_mult is not None:
            raise ConfigError(f"--width-mult scales attnfast's models; timm's {self.model} is built at its "
                              "own width")
        if self.pretrained:
            raise ConfigError(f"--pretrained loads AttnVGG's ImageNet weights; timm's {self.model} is built "
                              "with pretrained=False (nothing is downloaded)")
        if not self.normalize_attn:
            raise ConfigError(f"--sigmoid-attn is AttnVGG's; timm's {self.model} has no grid attention")


def option_name(field: str) -> str:
    """The command-line spelling of a :class:`TrainConfig` field (``normalize_attn`` -> ``--sigmoid-attn``)."""
    f = TrainConfig.__dataclass_fields__[field]
    return f.metadata.get("flag") or "--" + field.replace("_", "-")


SYNTHETIC_MIN_SIZE = 32  # smaller lesions/leaves lose the shape cues the labels follow


def synthetic_min_n(data: str, val_fraction: float) -> int:
    """Smallest synthetic set whose stratified split puts every class in train and in validation
    (5 leaf classes for synthetic-cassava, 2 for the lesions; 20 at least)."""
    classes = 5 if data == "synthetic-cassava" else 2
    return max(20, math.ceil(classes / min(val_fraction, 1 - val_fraction)))


__all__ = ["TrainConfig", "ConfigError", "MODELS", "ATTENTIONS", "AMP_MODES", "OPTIMIZERS", "SCHEDULERS",
           "option_name", "synthetic_min_n"]
