"""``attnfast`` command line: ``attnfast train`` and ``attnfast predict``.

``attnfast train`` with no arguments is the main job: synthetic lesion images, AttnVGG (1/8 width,
64 px, 4 epochs), about 30 s on 2 CPU cores; it prints validation AUC/AP per epoch and the
attention localization score, and writes metrics.csv, checkpoints and attention overlays into ``--out``.
``--model resnet50-cbam`` (or any timm model name) trains a timm model, with attnfast's fused modules swapped in.
Bad data or options print one ``error: ...`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from .data.errors import AttnfastDataError, one_line
from .train.config import AMP_MODES, MODELS, OPTIMIZERS, SCHEDULERS, ConfigError, TrainConfig


def _add_train(sub):
    p = sub.add_parser("train", help="train a model (no arguments: the synthetic main job)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="synthetic",
                   help="synthetic | synthetic-cassava | melanoma:DIR | cassava:DIR | folder:DIR")
    p.add_argument("--model", default="attnvgg", metavar="MODEL",
                   help=f"{' | '.join(MODELS)}, or a timm model (needs timm): ARCH-cbam / ARCH-lcbam = timm's ARCH "
                        "with CBAM in every block (e.g. resnet50-cbam), or any timm ARCH as timm builds it")
    p.add_argument("--image-size", type=int, default=None, help="resize+crop side (default 64 synthetic, 224 real)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 synthetic, 2 real (the seed's)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 synthetic, 100 real (the seed's)")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<time>)")
    p.add_argument("--attention", default="fused", choices=("fused", "reference"),
                   help="fused: attnfast's fused modules (timm models: put in by attnfast.swap, which reports what "
                        "it replaced); reference: plain PyTorch (timm models: timm's own modules)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES, help="auto: bf16 on a GPU that supports it, off on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    p.add_argument("--scheduler", default="none", choices=SCHEDULERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers, 0 or more (default 0 CPU, 4 GPU)")
    p.add_argument("--width-mult", type=float, default=None,
                   help="channel multiplier of attnfast's models (default 0.125 synthetic, 1.0 real; RAN stem = 64*W)")
    p.add_argument("--pretrained", action="store_true", help="AttnVGG: ImageNet vgg16_bn weights from the torch hub cache")
    p.add_argument("--dropout", type=float, default=None, help="dropout probability in [0, 1)")
    p.add_argument("--sigmoid-attn", action="store_true", help="AttnVGG: sigmoid attention + average pooling")
    p.add_argument("--max-benign", type=int, default=6000, help="melanoma: keep at most N benign images (0: all)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=1234)
    p.add_argument("--synthetic-n", type=int, default=2000,
                   help="images in the synthetic set (at least 20; synthetic-cassava at --val-fraction 0.2: 25)")
    p.add_argument("--synthetic-size", type=int, default=128, help="side of the synthetic images (at least 32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_predict(sub):
    p = sub.add_parser("predict", help="write a Kaggle submission from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="melanoma:DIR | cassava:DIR | folder:DIR | synthetic")
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--attention", default=None, choices=("fused", "reference"), help="default: as trained")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnfast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    _add_predict(sub)
    return parser


def _train_config(a) -> TrainConfig:
    return TrainConfig(data=a.data, model=a.model, image_size=a.image_size, epochs=a.epochs, batch_size=a.batch_size,
                       out=a.out, attention=a.attention, amp=a.amp, compile=a.compile, resume=a.resume,
                       optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum,
                       scheduler=a.scheduler, seed=a.seed, workers=a.workers, width_mult=a.width_mult,
                       pretrained=a.pretrained, dropout=a.dropout, normalize_attn=not a.sigmoid_attn,
                       max_benign=a.max_benign, val_fraction=a.val_fraction, split_seed=a.split_seed,
                       synthetic_n=a.synthetic_n, synthetic_size=a.synthetic_size, device=a.device,
                       progress=not a.no_progress)


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["train"]
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from .train import train

            train(_train_config(args))
        else:
            from .train import predict

            n = predict(args.checkpoint, args.data, args.out, attention=args.attention,
                        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
            print(f"wrote {n} predictions to {args.out}")
    except (AttnfastDataError, ConfigError) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")  # one write: DDP ranks sharing stderr don't interleave
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (the last completed epoch is in last.pt; rerun with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
