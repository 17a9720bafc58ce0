"""The training loop behind ``attnfast train`` (single process or DDP under torchrun)."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler
from torchvision.ops import sigmoid_focal_loss
from ..data import AttnfastDataError, Preprocessing, build_datasets, ensure_synthetic, parse_spec, read_layout
from . import distributed as dist_utils
from .checkpoint import atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig
from .metrics import attention_mass_inside, binary_metrics, mask_area, multiclass_metrics
from .progress import bar as progress_bar
from .visualize import forward_with_maps, overlay_png, split_output

# The seeds' FocalLoss: alpha * (1 - pt)**gamma * BCE with the same alpha for EVERY sample. torchvision's
# alpha weights positives alpha and negatives 1 - alpha, so it is called with alpha=-1 (no class weighting)
# and the constant alpha applied outside.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0

# Options a resumed run may change: where/how it runs, not what it trains.
RUN_CONTROL_FIELDS = frozenset({"out", "resume", "epochs", "progress", "workers", "device", "compile", "amp",
                                "overlay_count"})


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
    """``create_model(name, ...)``: attnfast's model ``name`` with ``attention`` modules, or the timm model
    ``name`` (any name that is not attnfast's), whose fused version is made by :func:`attnfast.swap`; for those,
    a line saying what swap replaced is appended to ``report``."""
    from ..models import MODEL_BUILDERS, create_model

    if name not in MODEL_BUILDERS:
        from ..models import timm_models

        return timm_models.create(name, num_outputs, attention=attention, report=report, **kwargs)
    return create_model(name, num_outputs, attention=attention, **kwargs)


def build_from_checkpoint(meta: dict, attention: str | None = None, report: list | None = None):
    """The checkpoint's architecture with ``pretrained=False``: the checkpoint holds every weight, so the
    ImageNet file in the hub cache (which a training run may have started from) is not needed."""
    kwargs = dict(meta["model_kwargs"])
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False
    return build_model(meta["model"], meta["num_outputs"], attention or meta["attention"], kwargs, report)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The seeds' FocalLoss on logits: ``alpha * (1 - pt)**gamma * BCE``, alpha the same for every sample."""
    return FOCAL_ALPHA * sigmoid_focal_loss(logits.float().view(-1), targets.float().view(-1), alpha=-1,
                                            gamma=FOCAL_GAMMA, reduction=reduction)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    if task == "binary":
        return focal_loss(logits, targets)
    return F.cross_entropy(logits.float(), targets.long())


def _amp_dtype(cfg: TrainConfig, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        # bf16 on a GPU that supports it; off on CPU
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        mode = "bf16" if ok else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrainConfig, opt):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None


class Trainer:
    """Holds everything one run needs; :meth:`fit` runs the epochs."""

    def __init__(self, cfg: TrainConfig, log=print):
        self.rank, self.world, local_rank = dist_utils.setup()
        self.is_main = self.rank == 0
        self.cfg = cfg = cfg.resolved()
        if self.world > 1:  # the default --out holds a timestamp: every rank uses rank 0's
            cfg.out = dist_utils.broadcast_object(cfg.out)
        self.log = log
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = cfg.out
        self.last_path = os.path.join(self.out, "last.pt")
        self.best_path = os.path.join(self.out, "best.pt")
        # decided on rank 0 and shared, so every rank stops with the same one-line error (none is left waiting)
        has_run = dist_utils.broadcast_object(os.path.exists(self.last_path) if self.is_main else None)
        if has_run and not cfg.resume:
            raise ConfigError(f"{self.out} already holds a run (last.pt); pass --resume to continue it "
                              "or choose another --out")
        if cfg.resume and not has_run:
            raise ConfigError(f"--resume: no checkpoint at {self.last_path}")
        resume_from = load_checkpoint(self.last_path) if cfg.resume else None
        if resume_from is not None:
            self._check_same_run(resume_from.get("config", {}))

        info = load_data_info(cfg.data, cfg, rank=self.rank)
        self.info = info
        self.task = info.task
        self.num_outputs = 1 if info.task == "binary" else info.num_classes
        is_melanoma = info.kind == "melanoma"
        self.prep = Preprocessing(image_size=cfg.image_size,
                                  max_per_class={0: cfg.max_benign} if is_melanoma and cfg.max_benign else None,
                                  val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
        self.train_ds, self.val_ds = build_datasets(info, self.prep)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model_kwargs = model_kwargs(cfg)
        self.build_notes: list = []  # what attnfast.swap did to a timm model, logged with the run's header
        try:
            if cfg.resume:  # every weight comes from last.pt: no ImageNet file needed
                model = build_from_checkpoint(self._meta(), report=self.build_notes)
            else:
                model = build_model(cfg.model, self.num_outputs, cfg.attention, self.model_kwargs, self.build_notes)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise ConfigError(f"cannot build --model {cfg.model} --attention {cfg.attention}: {e}") from None
        self.raw_model = model.to(self.device)
        self.optimizer = _optimizer(cfg, self.raw_model.parameters())
        self.scheduler = _scheduler(cfg, self.optimizer)
        self.amp_dtype = _amp_dtype(cfg, self.device)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.start_epoch = 0
        self.best = -math.inf
        self.best_epoch = -1
        self.history: list = []
        if resume_from is not None:
            self._restore(resume_from)
        model = self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model
        workers = cfg.workers if cfg.workers is not None else (4 if self.device.type == "cuda" else 0)
        self.workers = workers
        self.val_sampler = (DistributedSampler(self.val_ds, self.world, self.rank, shuffle=False)
                            if self.world > 1 else None)
        self.val_loader = DataLoader(self.val_ds, batch_size=cfg.batch_size, shuffle=False,
                                     sampler=self.val_sampler, num_workers=workers,
                                     pin_memory=self.device.type == "cuda")

    # ---------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "num_outputs": self.num_outputs,
                "task": self.task, "class_names": self.info.class_names, "kind": self.info.kind,
                "id_column": self.info.id_column, "target_column": self.info.target_column,
                "preprocessing": dataclasses.asdict(self.prep), "attention": self.cfg.attention}

    def _state(self, epoch: int) -> dict:
        return {"epoch": epoch, "model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "rng": rng_state(), "best": self.best,
                "best_epoch": self.best_epoch, "history": self.history, "config": dataclasses.asdict(self.cfg),
                "meta": self._meta(), "attnfast_checkpoint": 1}

    def _check_same_run(self, old: dict) -> None:
        """A resume continues the same run: every option but the run-control ones must match."""
        now = dataclasses.asdict(self.cfg)
        diff = [f"{_option(k)} {old[k]!r} (now {now[k]!r})" for k in now
                if k not in RUN_CONTROL_FIELDS and k in old and old[k] != now[k]]
        if diff:
            raise ConfigError(f"--resume: {self.last_path} was trained with other options: {'; '.join(diff)}. "
                              "Resume with the same options (only --epochs, --device, --workers, --amp, --compile "
                              "and progress may change) or choose another --out")

    def _restore(self, ck: dict) -> None:
        self.raw_model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck.get("scheduler"):
            self.scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler") and self.scaler.is_enabled():  # --amp may have changed: a disabled scaler has no state
            self.scaler.load_state_dict(ck["scaler"])
        self.start_epoch = ck["epoch"]
        self.best, self.best_epoch = ck["best"], ck["best_epoch"]
        self.history = list(ck["history"])
        set_rng_state(ck["rng"])

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
        self.model.train()
        total, count = torch.zeros((), dtype=torch.float64), 0
        loader = self._train_loader(epoch)
        with _batches(loader) as batches:
            bar = progress_bar(batches, f"epoch {epoch + 1}/{self.cfg.epochs} train", enabled=self._progress(),
                               total=len(loader))
            for x, y in bar:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss = self.train_step(x, y)
                total += loss.double().cpu() * x.shape[0]
                count += x.shape[0]
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if self.scheduler is not None:
            self.scheduler.step()
        sums = dist_utils.all_reduce_sum([float(total), float(count)])
        return sums[0] / max(sums[1], 1)

    @torch.no_grad()
    def evaluate(self):
        """Whole-epoch validation: every image's prediction (gathered across ranks, duplicates dropped)."""
        self.model.eval()
        order = list(iter(self.val_sampler)) if self.val_sampler is not None else list(range(len(self.val_ds)))
        idx_all, scores, targets, losses, locs = [], [], [], [], []
        pos = 0
        with _batches(self.val_loader) as batches:
            for batch in progress_bar(batches, "validate", enabled=self._progress(), total=len(self.val_loader)):
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                with self._autocast():
                    logits, maps = forward_with_maps(self.model, x, want_maps=len(batch) > 2)
                logits = logits.float()
                n = x.shape[0]
                idx_all += order[pos:pos + n]
                pos += n
                if self.task == "binary":
                    scores.append(torch.sigmoid(logits.view(-1)).cpu())
                    losses.append(focal_loss(logits, y, reduction="none").cpu())
                else:
                    scores.append(logits.argmax(1).cpu())
                    losses.append(F.cross_entropy(logits, y.long(), reduction="none").cpu())
                targets.append(y.cpu())
                if len(batch) > 2:
                    mask = batch[2].to(self.device)
                    row = [mask_area(mask).cpu()] + [attention_mass_inside(a, mask).cpu() for _, a in maps]
                    locs.append(torch.stack(row, 1))
        local = {"idx": idx_all, "score": torch.cat(scores).tolist(), "target": torch.cat(targets).tolist(),
                 "loss": torch.cat(losses).tolist(), "loc": torch.cat(locs).tolist() if locs else []}
        parts = dist_utils.all_gather_object(local)
        seen, rows = set(), []
        for part in parts:
            for k, i in enumerate(part["idx"]):
                if i in seen:  # DistributedSampler pads the last ranks with repeats
                    continue
                seen.add(i)
                rows.append((part["score"][k], part["target"][k], part["loss"][k],
                             part["loc"][k] if part["loc"] else None))
        score = np.array([r[0] for r in rows])
        target = np.array([r[1] for r in rows]).astype(int)
        res = {"val_loss": float(np.mean([r[2] for r in rows])), "val_count": len(rows)}
        if self.task == "binary":
            res.update({f"val_{k}": v for k, v in binary_metrics(score, target).items()})
        else:
            res.update({f"val_{k}": v for k, v in
                        multiclass_metrics(score.astype(int), target, self.num_outputs).items()})
        if rows and rows[0][3] is not None:
            loc = np.array([r[3] for r in rows])
            res["loc_uniform"] = float(loc[:, 0].mean())
            names = self.map_names or [f"map{i}" for i in range(loc.shape[1] - 1)]
            pos = target == 1  # binary: the malignant images, where the lesion is the evidence
            if self.task == "binary" and pos.any():
                res["loc_uniform_malignant"] = float(loc[pos, 0].mean())
            for j, name in enumerate(names):
                res[f"loc_{_slug(name)}"] = float(loc[:, j + 1].mean())
                if self.task == "binary" and pos.any():
                    res[f"loc_{_slug(name)}_malignant"] = float(loc[pos, j + 1].mean())
        return res

    @property
    def map_names(self):
        return getattr(self, "_map_names", None)

    def _progress(self) -> bool:
        return self.cfg.progress and self.is_main

    def metric_key(self) -> str:
        return "val_auc" if self.task == "binary" else "val_acc"

    def write_overlay(self, epoch: int) -> str | None:
        n = min(self.cfg.overlay_count, len(self.val_ds))
        if n == 0:
            return None
        x = torch.stack([self.val_ds[i][0] for i in range(n)]).to(self.device)
        self.model.eval()
        with torch.no_grad(), self._autocast():
            _, maps = forward_with_maps(self.raw_model, x)
        self._map_names = [name for name, _ in maps]
        if not maps:
            return None
        labels = [self.val_ds.samples[i].label for i in range(n)]
        title = (f"epoch {epoch + 1}  labels: " +
                 " ".join(self.info.class_names[k] if self.task != "binary" else "BM"[k] for k in labels))
        png = overlay_png(x, maps[:3], self.prep.mean, self.prep.std, title=title)
        path = os.path.join(self.out, "overlays", f"epoch_{epoch + 1:03d}.png")
        atomic_write(path, lambda f: f.write(png))
        return path

    def _write_metrics_csv(self) -> None:
        keys = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")  # plain lines, no CRLF
        w.writeheader()
        for row in self.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write(os.path.join(self.out, "metrics.csv"), lambda f: f.write(buf.getvalue()), mode="w")

    def fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            self.log(f"attnfast train: {cfg.model} ({cfg.attention} attention) on {cfg.data} "
                     f"[{len(self.train_ds)} train / {len(self.val_ds)} val, {self.info.num_classes} classes], "
                     f"{cfg.image_size}px, batch {cfg.batch_size}, {cfg.epochs} epochs, device {self.device}"
                     f"{f' x{self.world}' if self.world > 1 else ''}, out {self.out}")
            for note in self.build_notes:
                self.log(note)
            if self.start_epoch:
                self.log(f"resumed from {self.last_path} after epoch {self.start_epoch}")
        t_start, c_start = time.time(), time.process_time()
        for epoch in range(self.start_epoch, cfg.epochs):
            t0, c0 = time.time(), time.process_time()
            train_loss = self.train_epoch(epoch)
            overlay = self.write_overlay(epoch) if self.is_main else None
            if not self.is_main:  # rank 0 learned the map names from the overlay batch; others need them too
                self._map_names = self._probe_map_names()
            res = self.evaluate()
            row = {"epoch": epoch + 1, "train_loss": train_loss, **res,
                   "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": time.time() - t0,
                   "epoch_cpu_s": time.process_time() - c0}
            self.history.append(row)
            metric = res.get(self.metric_key(), math.nan)
            if math.isnan(metric):
                metric = -res["val_loss"]
            improved = metric > self.best
            if improved:
                self.best, self.best_epoch = metric, epoch + 1
            if self.is_main:
                state = self._state(epoch + 1)
                save_checkpoint(state, self.last_path)
                if improved:
                    save_checkpoint(state, self.best_path)
                self._write_metrics_csv()
                self.log(_format_row(row) + (f"  overlay {overlay}" if overlay else ""))
            dist_utils.barrier()
        summary = {"out": self.out, "epochs": cfg.epochs, "best_epoch": self.best_epoch,
                   "best_" + self.metric_key(): self.best, "final": self.history[-1] if self.history else {},
                   "train_time_s": time.time() - t_start, "train_cpu_s": time.process_time() - c_start}
        if self.is_main:
            atomic_write(os.path.join(self.out, "summary.json"),
                         lambda f: f.write(json.dumps(summary, indent=1, default=float)), mode="w")
            final = summary["final"]
            if any(k.startswith("loc_") and not k.startswith("loc_uniform") for k in final):
                locs = ", ".join(f"{k[4:]} {v:.3f}" for k, v in final.items()
                                 if k.startswith("loc_") and not k.startswith("loc_uniform"))
                self.log(f"attention localization (share of attention mass inside the lesion mask): {locs} "
                         f"(uniform attention would score {final['loc_uniform']:.3f}"
                         + (f", {final['loc_uniform_malignant']:.3f} on malignant" if "loc_uniform_malignant" in final
                            else "") + ")")
            self.log(f"done in {summary['train_time_s']:.0f}s ({summary['train_cpu_s']:.0f} CPU-s); best "
                     f"{self.metric_key()[4:]} {self.best:.4f} at epoch {self.best_epoch}; outputs in {self.out}")
        return summary

    def _probe_map_names(self):
        x = self.val_ds[0][0][None].to(self.device)
        self.model.eval()
        with torch.no_grad():
            _, maps = forward_with_maps(self.raw_model, x)
        return [name for name, _ in maps]


@contextlib.contextmanager
def _batches(loader: DataLoader):
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


def _option(field: str) -> str:
    """The command-line spelling of a config field."""
    return "--sigmoid-attn (inverted)" if field == "normalize_attn" else "--" + field.replace("_", "-")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.replace(" attention", "").replace(" mask", "")).strip("_")


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}", f"val loss {row['val_loss']:.4f}"]
    for k in ("val_auc", "val_ap", "val_acc"):
        if k in row:
            parts.append(f"{k[4:]} {row[k]:.4f}")
    locs = [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("loc_") and not k.startswith("loc_uniform")]
    if locs:
        parts.append("loc " + " ".join(locs))
    parts.append(f"{row['epoch_time_s']:.0f}s ({row['epoch_cpu_s']:.0f} CPU-s)")
    return " | ".join(parts)


def train(cfg: TrainConfig, log=print) -> dict:
    """Run one training job; returns a summary dict (also written to ``<out>/summary.json``)."""
    try:
        return Trainer(cfg, log=log).fit()
    finally:
        dist_utils.cleanup()


__all__ = ["train", "Trainer", "TrainConfig", "ConfigError", "AttnfastDataError", "compute_loss", "focal_loss",
           "load_data_info", "build_model", "build_from_checkpoint"]
