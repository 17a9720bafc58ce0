"""Training pipeline behind ``attnfast train`` / ``attnfast predict`` (see docs/training.md).

``train(TrainConfig(...))`` runs a job (single process, or DDP under torchrun) and writes metrics.csv,
last.pt / best.pt (atomically), overlays/epoch_NNN.png and summary.json into ``--out``;
``predict(checkpoint, data, out)`` writes a Kaggle submission; ``load_model("best.pt")`` rebuilds a trained model.

Modules: ``config`` (TrainConfig: every option, once), ``loop`` (Trainer, train), ``evaluation`` (validation
metrics), ``losses``, ``build`` (data, model, optimizer, device), ``run_dir`` (the run folder's files),
``checkpoint`` (safe loading, atomic writes), ``visualize`` (attention maps, overlay pictures), ``report`` (log
lines), ``predict``, ``distributed``, ``metrics``, ``progress``.
"""
from .build import build_from_checkpoint, build_model, load_data_info, load_model
from .config import ConfigError, TrainConfig
from .errors import DivergedError, OutputError
from .loop import Trainer, train
from .losses import compute_loss, focal_loss
from .predict import predict

__all__ = ["TrainConfig", "ConfigError", "OutputError", "DivergedError", "Trainer", "train", "predict",
           "load_model", "compute_loss", "focal_loss", "build_model", "build_from_checkpoint", "load_data_info"]
