"""The training loop behind ``attnfast train`` (single process or DDP under torchrun): :class:`Trainer` sets a run
up (checks, data, model, optimizer, a resumed state) and :meth:`Trainer.fit` runs its epochs."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..data import Preprocessing, build_datasets, listing_digest
from . import distributed as dist_utils
from . import report
from .build import (amp_dtype, build_from_checkpoint, build_model, load_data_info, load_weights, make_optimizer,
                    make_scheduler, model_kwargs, resolve_device)
from .checkpoint import FORMAT_VERSION, TRAINING_KEYS, read_checkpoint, rng_state, set_rng_state
from .config import ConfigError, TrainConfig, option_name
from .errors import DivergedError, OutputError
from .evaluation import batches, evaluate
from .losses import compute_loss
from .progress import bar as progress_bar
from .run_dir import RunFolder
from .visualize import epoch_overlay, map_names, split_output

# Options a resumed run may change: where/how it runs, not what it trains.
RUN_CONTROL_FIELDS = frozenset({"out", "resume", "epochs", "progress", "workers", "device", "compile", "amp",
                                "overlay_count"})


class Trainer:
    """Holds everything one run needs; :meth:`fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, log=print):
        self.rank, self.world, local_rank = dist_utils.setup()
        self.is_main = self.rank == 0
        self.cfg = cfg = cfg.resolved()
        if self.world > 1:  # the default --out holds a timestamp: every rank uses rank 0's
            cfg.out = dist_utils.broadcast_object(cfg.out)
        self.log = log
        self.device = resolve_device(cfg.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = cfg.out
        self.run = RunFolder(cfg.out)
        self.last_path, self.best_path = self.run.last, self.run.best
        # decided on rank 0 and shared, so every rank stops with the same one-line error (none is left waiting)
        problem = dist_utils.broadcast_object(self.run.problem(cfg.resume) if self.is_main else None)
        if problem:
            raise ConfigError(problem)
        # --resume of a run killed before its first last.pt: nothing to continue, it starts again
        self.restart = cfg.resume and dist_utils.broadcast_object(
            self.run.interrupted_first_epoch() if self.is_main else None)
        resume_from = (read_checkpoint(self.last_path, "--resume", TRAINING_KEYS)
                       if cfg.resume and not self.restart else None)
        if resume_from is not None:
            self._check_same_run(resume_from["config"])

        info = load_data_info(cfg.data, cfg, rank=self.rank)
        self.info = info
        self.task = info.task
        self.num_outputs = 1 if info.task == "binary" else info.num_classes
        is_melanoma = info.kind == "melanoma"
        self.prep = Preprocessing(image_size=cfg.image_size,
                                  max_per_class={0: cfg.max_benign} if is_melanoma and cfg.max_benign else None,
                                  val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
        self.data_digest = listing_digest(info.samples)
        if resume_from is not None:
            self._check_same_data(resume_from["meta"])
        self.train_ds, self.val_ds = build_datasets(info, self.prep)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model_kwargs = model_kwargs(cfg)
        self.build_notes: list = []  # what attnfast.swap did to a timm model, logged with the run's header
        try:
            if resume_from is not None:  # every weight comes from last.pt: no ImageNet file needed
                model = build_from_checkpoint(self._meta(), report=self.build_notes)
            else:
                model = build_model(cfg.model, self.num_outputs, cfg.attention, self.model_kwargs, self.build_notes)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise ConfigError(f"cannot build --model {cfg.model} --attention {cfg.attention}: {e}") from None
        self.raw_model = model.to(self.device)
        self.optimizer = make_optimizer(cfg, self.raw_model.parameters())
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.best = -math.inf
        self.best_epoch = -1
        self.history: list = []
        self.resumed = resume_from is not None
        if resume_from is not None:
            self._restore(resume_from)
        probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=self.device)  # names only: no image read
        self.map_names, self.overlay_names = map_names(self.raw_model, probe)
        model = self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model
        self.workers = cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.val_sampler = (DistributedSampler(self.val_ds, self.world, self.rank, shuffle=False)
                            if self.world > 1 else None)
        self.val_loader = DataLoader(self.val_ds, batch_size=cfg.batch_size, shuffle=False,
                                     sampler=self.val_sampler, num_workers=self.workers,
                                     pin_memory=self.device.type == "cuda")

    # ---------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "num_outputs": self.num_outputs,
                "task": self.task, "class_names": self.info.class_names, "kind": self.info.kind,
                "id_column": self.info.id_column, "target_column": self.info.target_column,
                "preprocessing": dataclasses.asdict(self.prep), "attention": self.cfg.attention,
                "data_digest": self.data_digest, "data_images": len(self.info.samples)}

    def _state(self, epoch: int) -> dict:
        return {"epoch": epoch, "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "best": self.best,
                "best_epoch": self.best_epoch, "history": self.history, "config": dataclasses.asdict(self.cfg),
                "meta": self._meta(), "attnfast_checkpoint": FORMAT_VERSION}

    def _check_same_run(self, old) -> None:
        """A resume continues the same run: every option but the run-control ones must match."""
        if not isinstance(old, dict):
            raise ConfigError(f"--resume {self.last_path}: not an attnfast checkpoint (its 'config' is not a dict)")
        now = dataclasses.asdict(self.cfg)
        diff = [f"{option_name(k)} {old[k]!r} (now {now[k]!r})" for k in now
                if k not in RUN_CONTROL_FIELDS and k in old and old[k] != now[k]]
        if diff:
            raise ConfigError(f"--resume: {self.last_path} was trained with other options: {'; '.join(diff)}. "
                              "Resume with the same options (only --epochs, --device, --workers, --amp, --compile, "
                              "--overlay-count and progress may change) or choose another --out")

    def _check_same_data(self, meta: dict) -> None:
        """A resume trains on the data the run started with: the same listing, so the same split."""
        old = meta.get("data_digest")
        if old is not None and old != self.data_digest:
            raise ConfigError(f"--resume: the data of --data {self.cfg.data} changed since {self.last_path} was "
                              f"written ({meta.get('data_images')} images listed then, {len(self.info.samples)} "
                              "now, or other ids/labels): the train/validation split would change and validation "
                              "images could already have been trained on. Resume with the data the run started "
                              "with, or start a new run in another --out")

    def _restore(self, ck: dict) -> None:
        load_weights(self.raw_model, ck["model"], self.last_path, "--resume")
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
            if self.scheduler is not None and ck.get("scheduler"):
                self.scheduler.load_state_dict(ck["scheduler"])
            if ck.get("scaler") and self.scaler.is_enabled():  # --amp may have changed: a disabled scaler has no state
                self.scaler.load_state_dict(ck["scaler"])
            self.start_epoch = int(ck["epoch"])
            self.best, self.best_epoch = float(ck["best"]), int(ck["best_epoch"])
            self.history = list(ck["history"])
            set_rng_state(ck["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise ConfigError(f"--resume {self.last_path}: its training state does not fit this run "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    # ---------------------------------------------------------------- loops
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_loader(self, epoch: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        if self.world > 1:
            sampler = DistributedSampler(self.train_ds, self.world, self.rank, shuffle=True, seed=self.cfg.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.train_ds, generator=g)
        return DataLoader(self.train_ds, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.workers,
                          generator=g, pin_memory=self.device.type == "cuda", drop_last=False)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached, fp32) loss.

        Under ``--amp fp16`` the GradScaler multiplies the loss by its scale before ``backward``, unscales the
        gradients before the optimizer sees them, skips the step when any gradient is inf/NaN and then
        halves the scale (it doubles after 2000 clean steps). Otherwise the scaler is disabled and this
        is a plain ``backward`` + ``step``.
        """
        with self._autocast():
            logits = split_output(self.model(x))[0]
        loss = compute_loss(logits, y, self.task)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def train_epoch(self, epoch: int) -> float:
        """One epoch; the mean training loss. A non-finite loss stops the run (:class:`DivergedError`): at once
        in a single process, at the end of the epoch under DDP (every rank has to reach the same collectives)."""
        self.model.train()
        total, count, bad = 0.0, 0, None
        loader = self._train_loader(epoch)
        with batches(loader) as it:
            bar = progress_bar(it, f"epoch {epoch + 1}/{self.cfg.epochs} train", enabled=self._progress(),
                               total=len(loader))
            for step, (x, y) in enumerate(bar, 1):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                value = self.train_step(x, y).item()
                if not math.isfinite(value) and bad is None:
                    bad = (step, value)
                    if self.world == 1:
                        break
                total += value * x.shape[0]
                count += x.shape[0]
                bar.set_postfix(loss=f"{value:.4f}")
        sums = dist_utils.all_reduce_sum([total, float(count), float(bad is not None)])
        if sums[2]:
            first = next(b for b in dist_utils.all_gather_object(bad) if b is not None)
            raise self._diverged(epoch, first, len(loader))
        if self.scheduler is not None:
            self.scheduler.step()
        return sums[0] / max(sums[1], 1)

    def _diverged(self, epoch: int, bad: tuple, steps: int) -> DivergedError:
        step, value = bad
        kept = (f"last.pt and best.pt in {self.out} hold the last good epoch ({epoch})" if epoch
                else "no checkpoint was written")
        return DivergedError(f"training diverged: the loss became {value} at epoch {epoch + 1}, step {step} of "
                             f"{steps} (--lr {self.cfg.lr}); {kept}. Try a lower --lr")

    def evaluate(self) -> dict:
        """Whole-epoch validation: every image's prediction (gathered across ranks, duplicates dropped)."""
        return evaluate(self.model, self.val_loader, self.val_sampler, self.task, self.num_outputs, self.device,
                        self._autocast, self.map_names, progress=self._progress())

    def _progress(self) -> bool:
        return self.cfg.progress and self.is_main

    def metric_key(self) -> str:
        return "val_auc" if self.task == "binary" else "val_acc"

    def write_overlay(self, epoch: int) -> str | None:
        labels = [self.val_ds.samples[i].label for i in range(min(self.cfg.overlay_count, len(self.val_ds)))]
        title = (f"epoch {epoch + 1}  labels: " +
                 " ".join(self.info.class_names[k] if self.task != "binary" else "BM"[k] for k in labels))
        png = epoch_overlay(self.raw_model, self.val_ds, self.cfg.overlay_count, self.device, self._autocast,
                            title, self.prep.mean, self.prep.std)
        return None if png is None else self.run.write_overlay(epoch + 1, png)

    def _on_main(self, fn):
        """``fn()`` on rank 0; an :class:`OutputError` there stops every rank with the same line."""
        message = None
        if self.is_main:
            try:
                fn()
            except OutputError as e:
                message = str(e)
        message = dist_utils.broadcast_object(message)
        if message:
            raise OutputError(message)

    def _start(self) -> None:
        cfg = self.cfg
        gone = self.run.clean_temporaries()
        self.log(report.header(cfg, self.info, len(self.train_ds), len(self.val_ds), self.device, self.world))
        for note in self.build_notes:
            self.log(note)
        self.log(report.overlay_note(cfg.model, self.overlay_names, cfg.overlay_count))
        if gone:
            self.log(f"removed {len(gone)} temporary file(s) an interrupted write had left in {self.out}")
        if self.restart:
            self.run.drop_pending()
            self.log(f"{self.out} held no last.pt: its run was interrupted in its first epoch and starts again")
        if self.resumed:
            self.run.reconcile_best(self.best_epoch, self.start_epoch, self.log)
            self.log(f"resumed from {self.last_path} after epoch {self.start_epoch}")

    def fit(self) -> dict:
        cfg = self.cfg
        self._on_main(self._start)
        t_start, c_start = time.time(), time.process_time()
        for epoch in range(self.start_epoch, cfg.epochs):
            t0, c0 = time.time(), time.process_time()
            train_loss = self.train_epoch(epoch)
            overlay = []
            self._on_main(lambda: overlay.append(self.write_overlay(epoch)))
            res = self.evaluate()
            row = {"epoch": epoch + 1, "train_loss": train_loss, **res,
                   "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                   "epoch_cpu_s": time.process_time() - c0}
            metric = res.get(self.metric_key(), math.nan)
            if math.isnan(metric):
                metric = -res["val_loss"]
            improved = metric > self.best
            self.history.append(row)
            if improved:
                self.best, self.best_epoch = metric, epoch + 1
            self._on_main(lambda: self._write_epoch(epoch, improved, row, overlay))
        summary = {"out": self.out, "epochs": cfg.epochs, "best_epoch": self.best_epoch,
                   "best_" + self.metric_key(): self.best, "final": self.history[-1] if self.history else {},
                   "data": {"listing_sha256": self.data_digest, "images": len(self.info.samples),
                            "train": len(self.train_ds), "val": len(self.val_ds)},
                   "train_time_s": time.time() - t_start, "train_cpu_s": time.process_time() - c_start}
        self._on_main(lambda: self._finish(summary))
        return summary

    def _write_epoch(self, epoch: int, improved: bool, row: dict, overlay: list) -> None:
        self.run.write_checkpoints(self._state(epoch + 1), improved, previous_epoch=epoch)
        self.run.write_metrics(self.history)
        path = overlay[0] if overlay else None
        self.log(report.epoch_line(row) + (f"  overlay {path}" if path else ""))

    def _finish(self, summary: dict) -> None:
        self.run.write_summary(summary)
        line = report.localization_line(summary["final"])
        if line:
            self.log(line)
        self.log(report.done_line(summary, self.metric_key(), self.out))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run one training job; returns a summary dict (also written to ``<out>/summary.json``)."""
    try:
        return Trainer(cfg, log=log).fit()
    finally:
        dist_utils.cleanup()


__all__ = ["Trainer", "train", "RUN_CONTROL_FIELDS"]
