"""``attnfast`` command line: ``attnfast train`` and ``attnfast predict``.

``attnfast train`` with no arguments is the main job: synthetic lesion images, AttnVGG (1/8 width,
64 px, 4 epochs), a few minutes on 2 CPU cores; it prints validation AUC/AP per epoch and the
attention localization score, and writes metrics.csv, checkpoints and attention overlays into ``--out``.
``--model resnet50-cbam`` (or any timm model name) trains a timm model, with attnfast's fused modules swapped in.
Bad data or options print one ``error: ...`` line and exit with status 2; a run that cannot write its files
(disk full) or whose loss diverges prints one ``error: ...`` line and exits with status 1. ``attnfast`` alone
prints this help and exits with status 2 (it does nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from . import __version__
from .data.errors import AttnfastDataError, one_line
from .train.config import ATTENTIONS, DEVICE_HELP, TrainConfig, option_name
from .train.errors import ConfigError, DivergedError, OutputError

_SCALARS = {int: int, float: float, str: str}


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already speak of the default, and never for
    ``None`` (no value) or a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or not action.option_strings):
            return text
        return f"{text} (default: {default})"


def _scalar(hint):
    """``int`` for ``int`` or ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return _SCALARS[hint]


def _add_train(sub):
    p = sub.add_parser("train", help="train a model (no arguments: the synthetic main job)",
                       description="Train a model; every option below is a field of attnfast.train.TrainConfig.",
                       formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        flag = option_name(f.name)
        if hints[f.name] is bool:  # a flag: sets the field to the opposite of its default
            p.add_argument(flag, dest=f.name, default=f.default, help=meta["help"],
                           action="store_false" if f.default else "store_true")
        else:
            p.add_argument(flag, dest=f.name, default=f.default, type=_scalar(hints[f.name]),
                           choices=meta.get("choices"), help=meta["help"],
                           metavar=None if meta.get("choices") else f.name.upper())
    return p


def _add_predict(sub):
    p = sub.add_parser("predict", help="write a Kaggle submission from a checkpoint",
                       description="Predict every image of --data with a trained checkpoint and write a Kaggle "
                                   "submission CSV.", formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an attnfast checkpoint (a run's best.pt or last.pt)")
    p.add_argument("--data", required=True,
                   help="melanoma:DIR (test.csv, else the training listing) | cassava:DIR (test_images/) | "
                        "folder:DIR (every image under DIR) | synthetic")
    p.add_argument("--out", default="submission.csv",
                   help="the submission CSV to write (replaced atomically; never the checkpoint or an input file)")
    p.add_argument("--attention", default=None, choices=ATTENTIONS,
                   help="attention modules to run the model with (default: as trained)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass, at least 1")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnfast",
                                     description="attnfast: train an attention CNN, or predict with one.",
                                     epilog="`attnfast train` with no options runs the main job (synthetic data, "
                                            "a few minutes on a CPU).")
    parser.add_argument("--version", action="version", version=f"attnfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict}")
    _add_train(sub)
    _add_predict(sub)
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``attnfast train`` arguments (one field per option)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def _error(message: str, status: int) -> int:
    sys.stderr.write(f"error: {message}\n")  # one write: DDP ranks sharing stderr don't interleave
    sys.stderr.flush()
    return status


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .train import train

            train(train_config(args))
        else:
            from .train import predict

            n = predict(args.checkpoint, args.data, args.out, attention=args.attention,
                        batch_size=args.batch_size, device=args.device, progress=args.progress)
            print(f"wrote {n} predictions to {args.out}")
    except (AttnfastDataError, ConfigError) as e:
        return _error(one_line(e), 2)
    except (OutputError, DivergedError) as e:
        return _error(one_line(e), 1)
    except KeyboardInterrupt:
        return _error("interrupted (the last completed epoch is in last.pt; rerun with --resume)", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
