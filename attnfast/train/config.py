"""Training configuration: the seeds' choices as defaults, plus the main job's CPU-sized defaults."""
from __future__ import annotations

import dataclasses
import math
import os
import time

MODELS = ("attnvgg", "ran56", "ran92", "sagan_resnet")  # attnfast's own; any other --model names a timm model
AMP_MODES = ("auto", "bf16", "fp16", "off")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")

# The main job (``attnfast train`` with no arguments): synthetic lesions, AttnVGG at 1/8 width,
# 64 px, sized to finish in a few minutes on 2 CPU cores.
SYNTHETIC_DEFAULTS = {"image_size": 64, "width_mult": 0.125, "epochs": 4, "batch_size": 32}
REAL_DEFAULTS = {"image_size": 224, "width_mult": 1.0, "epochs": 2, "batch_size": 100}


class ConfigError(Exception):
    """An invalid combination of options (one line, printed by the CLI as ``error: ...``)."""


@dataclasses.dataclass
class TrainConfig:
    data: str = "synthetic"
    model: str = "attnvgg"  # one of MODELS, or a timm model: ARCH-cbam / ARCH-lcbam / ARCH (attnfast.models.timm_models)
    image_size: int | None = None  # None: 64 on synthetic data, 224 (the seed's) otherwise
    epochs: int | None = None
    batch_size: int | None = None
    out: str | None = None  # None: runs/<model>-<data>-<timestamp>
    attention: str = "fused"
    amp: str = "auto"  # auto: bf16 on a GPU that supports it, off on CPU
    compile: bool = False
    resume: bool = False
    optimizer: str = "adam"  # the seed's Adam, lr 1e-4
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "none"
    seed: int = 0
    workers: int | None = None  # None: 0 on CPU, 4 on GPU
    width_mult: float | None = None  # attnfast's models only (timm models keep their own width: stays None)
    pretrained: bool = False
    dropout: float | None = None
    normalize_attn: bool = True
    max_benign: int | None = 6000  # melanoma: keep at most this many benign images (the seed's); 0 or None = all
    val_fraction: float = 0.2
    split_seed: int = 1234
    synthetic_n: int = 2000
    synthetic_size: int = 128
    overlay_count: int = 8
    progress: bool = True
    device: str = "auto"

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in, validated."""
        c = dataclasses.replace(self)
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

        if self.is_timm:
            self._validate_timm()
        need(self.attention in ("fused", "reference"), f"--attention must be fused or reference; got {self.attention!r}")
        need(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        need(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        need(self.epochs >= 1, f"--epochs must be at least 1; got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1; got {self.batch_size}")
        need(self.lr > 0, f"--lr must be positive; got {self.lr}")
        need(0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        low = 64 if self.model.startswith("ran") else 32
        need(self.image_size >= low and self.image_size % 32 == 0,
             f"--image-size must be a multiple of 32 and at least {low} for {self.model} "
             f"(five 2x downsamplings); got {self.image_size}")
        if not self.is_timm:
            need(self.width_mult > 0, f"--width-mult must be positive; got {self.width_mult}")
            need(not (self.pretrained and self.width_mult != 1.0), "--pretrained needs --width-mult 1.0")
        need(self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1); got {self.dropout}")
        need(self.workers is None or self.workers >= 0, f"--workers must be 0 or more; got {self.workers}")
        need(self.max_benign is None or self.max_benign >= 0,
             f"--max-benign must be 0 (keep all) or more; got {self.max_benign}")
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


SYNTHETIC_MIN_SIZE = 32  # smaller lesions/leaves lose the shape cues the labels follow


def synthetic_min_n(data: str, val_fraction: float) -> int:
    """Smallest synthetic set whose stratified split puts every class in train and in validation
    (5 leaf classes for synthetic-cassava, 2 for the lesions; 20 at least)."""
    classes = 5 if data == "synthetic-cassava" else 2
    return max(20, math.ceil(classes / min(val_fraction, 1 - val_fraction)))
