"""The run folder (``--out``): what may be written there, in which order, and how a run finds it again.

- A new run refuses a folder that holds any file of a run (:data:`RUN_FILES`): nothing is overwritten. Only
  ``--resume`` continues a run, from its ``last.pt``.
- The folder is checked up front: a file instead of a folder, a folder that cannot be written, or an
  ``overlays`` entry that is a symbolic link (its pictures would land outside ``--out``) stops the run before
  any data is read.
- Every file is written atomically (a temporary file, then ``os.replace``); a full disk or any other write
  error stops the run with one line and leaves the files written before intact.
- Per epoch the checkpoints are written so that ``last.pt`` never names a best epoch whose weights are not on
  disk: an improved epoch goes first to ``best.pending.pt``, then ``last.pt`` records it, then the pending file
  replaces ``best.pt``. A run killed between the two steps is completed (or the pending file dropped, when
  ``last.pt`` never recorded it) on ``--resume``.
- Temporary files left by a process killed mid-write (``.last.pt.<random>.tmp``) are removed when a run starts.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile

from .checkpoint import load_checkpoint, save_checkpoint, stale_temporaries, write_output
from .errors import OutputError

LAST, BEST, PENDING = "last.pt", "best.pt", "best.pending.pt"
METRICS, SUMMARY, OVERLAYS = "metrics.csv", "summary.json", "overlays"
RUN_FILES = (LAST, BEST, PENDING, METRICS, SUMMARY, OVERLAYS)


class RunFolder:
    """The files of one run under ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.last = os.path.join(path, LAST)
        self.best = os.path.join(path, BEST)
        self.pending = os.path.join(path, PENDING)
        self.overlays = os.path.join(path, OVERLAYS)

    # ------------------------------------------------------------------------------------------ start
    def problem(self, resume: bool) -> str | None:
        """Why a run (``resume``: a continuation) cannot use this folder, as one line; ``None`` when it can."""
        out = self.path
        if os.path.exists(out) and not os.path.isdir(out):
            return f"--out {out} is a file, not a folder"
        if os.path.islink(self.overlays):
            return (f"--out {out}: {OVERLAYS} is a symbolic link (to {os.readlink(self.overlays)}); attnfast writes "
                    f"only inside --out: remove the link")
        if os.path.exists(self.overlays) and not os.path.isdir(self.overlays):
            return f"--out {out}: {OVERLAYS} is a file, not a folder"
        found = self.found()
        interrupted = self.interrupted_first_epoch()
        if resume and LAST not in found and not interrupted:
            return (f"--resume: no checkpoint at {self.last}" +
                    (f" ({out} holds {', '.join(found)}, but no last.pt to continue from)" if found else ""))
        if not resume and LAST in found:
            return f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
        if not resume and interrupted:
            return (f"{out} holds the files of a run interrupted in its first epoch ({', '.join(found)}); pass "
                    "--resume to start it again or choose another --out")
        if not resume and found:
            return (f"{out} already holds files of a run ({', '.join(found)}) and no last.pt to resume from; "
                    "attnfast never overwrites them: choose another --out or remove them")
        return _unwritable(out)

    def found(self) -> list:
        """The :data:`RUN_FILES` present in the folder."""
        return [name for name in RUN_FILES if os.path.lexists(os.path.join(self.path, name))]

    def interrupted_first_epoch(self) -> bool:
        """Whether the folder holds only what a run killed before its first last.pt leaves (overlays/,
        best.pending.pt): ``--resume`` then starts that run again from the beginning."""
        found = self.found()
        return bool(found) and set(found) <= {OVERLAYS, PENDING}

    def clean_temporaries(self) -> list:
        """Remove what :func:`atomic_write` left behind when a process was killed mid-write; the removed paths."""
        gone = []
        for folder, names in ((self.path, (LAST, BEST, PENDING, METRICS, SUMMARY)), (self.overlays, None)):
            if names is None:
                names = {e.split(".")[1] + ".png" for e in _listdir(folder) if e.startswith(".epoch_")}
            for name in names:
                for tmp in stale_temporaries(folder, name):
                    os.unlink(tmp)
                    gone.append(tmp)
        return gone

    def drop_pending(self) -> None:
        if os.path.isfile(self.pending):
            os.unlink(self.pending)

    def reconcile_best(self, recorded_epoch: int, last_epoch: int, log) -> None:
        """On ``--resume``: finish a best.pt replacement that a kill interrupted, or drop one ``last.pt`` never
        recorded; re-derive a missing best.pt from last.pt when the last epoch was the best."""
        if os.path.isfile(self.pending):
            try:
                epoch = load_checkpoint(self.pending).get("epoch")
            except Exception:  # a pending file is only ever committed when last.pt recorded it
                epoch = None
            if epoch is not None and epoch == recorded_epoch:
                os.replace(self.pending, self.best)
                log(f"best.pt: completed the replacement by epoch {epoch} that an interruption left pending")
            else:
                os.unlink(self.pending)
                log(f"best.pt: dropped {PENDING} (epoch {epoch}), which last.pt never recorded")
        if recorded_epoch >= 1 and not os.path.isfile(self.best):
            if recorded_epoch == last_epoch:
                shutil.copyfile(self.last, self.best)
                log(f"best.pt was missing; re-derived from last.pt (epoch {last_epoch} is the best)")
            else:
                log(f"warning: best.pt (epoch {recorded_epoch}) is missing; it is written again when an epoch "
                    "improves on it")

    # ------------------------------------------------------------------------------------------ writes
    def write_checkpoints(self, state: dict, improved: bool, previous_epoch: int) -> None:
        """``last.pt`` (and ``best.pt`` when ``improved``) for ``state``, in the order the module docstring gives."""
        kept = (f"last.pt and best.pt still hold epoch {previous_epoch}" if previous_epoch
                else "no checkpoint was written")
        if improved:
            save_checkpoint(state, self.pending, kept=kept)
        try:
            save_checkpoint(state, self.last, kept=kept)
        except OutputError:
            if improved and os.path.exists(self.pending):
                os.unlink(self.pending)
            raise
        if improved:
            try:
                os.replace(self.pending, self.best)
            except OSError as e:
                raise OutputError(f"cannot replace {self.best}: {e.strerror}; {PENDING} holds it and --resume "
                                  "completes it") from None

    def write_metrics(self, history: list) -> None:
        keys = []
        for row in history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")  # plain lines, no CRLF
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_output(os.path.join(self.path, METRICS), lambda f: f.write(buf.getvalue()), mode="w",
                     kept="the checkpoints are written")

    def write_summary(self, summary: dict) -> None:
        write_output(os.path.join(self.path, SUMMARY),
                     lambda f: f.write(json.dumps(summary, indent=1, default=float)), mode="w",
                     kept="the checkpoints and metrics.csv are written")

    def write_overlay(self, epoch: int, png: bytes) -> str:
        if os.path.islink(self.overlays):  # made a link while the run was going: still never followed
            raise OutputError(f"{self.overlays} became a symbolic link; attnfast writes only inside --out")
        path = os.path.join(self.overlays, f"epoch_{epoch:03d}.png")
        write_output(path, lambda f: f.write(png), kept=f"the checkpoints hold epoch {epoch - 1}")
        return path


def _listdir(folder: str) -> list:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _unwritable(out: str) -> str | None:
    """Why files cannot be created in ``out`` (created for the probe, then removed again if it was new)."""
    made = []
    try:
        head = os.path.abspath(out)
        while not os.path.exists(head):
            made.append(head)
            head = os.path.dirname(head)
        for folder in reversed(made):
            os.mkdir(folder)
        fd, probe = tempfile.mkstemp(prefix=".attnfast-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e})"
    finally:
        for folder in made:
            try:
                os.rmdir(folder)
            except OSError:
                pass
    return None


__all__ = ["RunFolder", "RUN_FILES"]
