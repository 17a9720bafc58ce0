"""Training pipeline behind ``attnfast train`` / ``attnfast predict``.

``train(TrainConfig(...))`` runs a job (single process, or DDP under torchrun) and writes metrics.csv,
last.pt / best.pt (atomically), overlays/epoch_NNN.png and summary.json into ``--out``;
``predict(checkpoint, data, out)`` writes a Kaggle submission.
"""
from .config import ConfigError, TrainConfig
from .engine import Trainer, build_model, compute_loss, load_data_info, train
from .predict import predict

__all__ = ["TrainConfig", "ConfigError", "Trainer", "train", "predict", "compute_loss", "build_model",
           "load_data_info"]
