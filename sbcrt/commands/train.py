"""`sbcrt train`: a new head for your own classes on a base model, trained on this machine (no torch)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sbcrt.commands.arguments import MODEL_ENV, positive_int, resolve_model
from sbcrt.errors import UsageError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a classifier for your own classes from photos in DATA/<label>/",
        description="Fit a new classifier head on a base model's features, from photos sorted into one folder "
        "per class (DATA/<label>/*.jpg; the folder names become the labels), and write one self-describing "
        ".onnx file that classify, watch, eval and bench use like any exported model. Cross-validation picks "
        "the head and its regularisation. Features are cached by photo content, so retraining after adding "
        "photos only runs the base model on the new ones. Exit status: 0 trained, 1 trained but some photos "
        "were unreadable, 2 usage error (nothing written).",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="folder of class folders: DATA/<label>/*.jpg")
    p.add_argument("-m", "--model", type=Path, help=f"the base .onnx model (required; default: ${MODEL_ENV})")
    p.add_argument("-o", "--output", type=Path, required=True, help="the trained .onnx file to write")
    p.add_argument(
        "--head",
        choices=("auto", "features", "prior", "features+prior"),
        default="auto",
        help="head kind: auto (cross-validation chooses, default), features (the base model's pooled features), "
        "prior (what the base model recognises, mapped to your classes), or both",
    )
    p.add_argument(
        "--augment",
        choices=("none", "flip", "crops"),
        default="flip",
        help="extra views per photo at feature level: none, flip (mirror image, default), crops (flip + the "
        "four corner crops; 6 inferences per photo)",
    )
    p.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--threads", type=positive_int, help="inference threads (default: one per physical core)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--confusion-png", type=Path, metavar="FILE", help="also draw the confusion matrix as a PNG")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    tune = p.add_argument_group("workstation only (needs pip install 'sbcrt[export]')")
    tune.add_argument(
        "--fine-tune",
        metavar="ARCH",
        help="instead of a head on a base .onnx, train the last stage and a new head of ARCH (efficientnet_lite0, "
        "sbcformer_xs/s/b/l) with torch from its checkpoint, then export and verify like `sbcrt export`",
    )
    tune.add_argument("--checkpoint", type=Path, help="--fine-tune: the base weights (default: Lite0's own)")
    tune.add_argument("--epochs", type=positive_int, default=5, help="--fine-tune: epochs per phase (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes")
    return p


def run(args: argparse.Namespace) -> int:
    from sbcrt.train.report import draw_confusion_png, render
    from sbcrt.train.trainer import TrainSettings, train

    if args.fine_tune:
        return _fine_tune(args)
    model = resolve_model(args, required=True)
    settings = TrainSettings(
        data=args.data,
        base_model=model,
        output=args.output,
        augmentation=args.augment,
        head=args.head,
        folds=args.folds,
        threads=args.threads,
        cache_dir=False if args.no_cache else None,
    )
    report = _with_progress(args, train, settings)
    if args.confusion_png is not None:
        draw_confusion_png(report, args.confusion_png)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report, notes=not args.quiet))
    return 1 if report.failures else 0


def _with_progress(args: argparse.Namespace, work: Callable[..., Any], settings: object) -> Any:
    """Run `work(settings)` with a progress bar on a terminal; print each unreadable photo's error line."""
    from sbcrt.commands.eval import ProgressBar

    progress = ProgressBar() if not args.quiet and sys.stderr.isatty() else None
    try:
        report = work(settings, progress=progress)
    finally:
        if progress:
            progress.close()
    for path, error in report.failures:
        print(f"{path}: error: {error}", file=sys.stderr)
    return report


def _fine_tune(args: argparse.Namespace) -> int:
    from sbcrt.commands.export import EXPORT_PACKAGES

    try:
        from sbcrt.export.fine_tune import FineTuneSettings, fine_tune
    except ModuleNotFoundError as exc:  # a runtime-only install (the Pi): torch, onnx or onnxscript is missing
        if (exc.name or "").split(".")[0] not in EXPORT_PACKAGES:
            raise
        raise UsageError(
            "--fine-tune needs PyTorch and ONNX (on a workstation): pip install 'sbcrt[export]' "
            f"({exc.name} is missing)"
        ) from None

    settings = FineTuneSettings(
        data=args.data, architecture=args.fine_tune, output=args.output, checkpoint=args.checkpoint, epochs=args.epochs
    )
    report = _with_progress(args, fine_tune, settings)
    print(report.render())
    return 1 if report.failures else 0
