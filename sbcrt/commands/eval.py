"""`sbcrt eval`: top-1/top-5 of a model on labelled photos, and (with --vs) its agreement with a second model."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sbcrt.commands.arguments import add_model_arguments, load_classifier, positive_int, resolve_model
from sbcrt.errors import UsageError

PER_CLASS_SHOWN = 10  # the human summary lists the worst classes; --json has them all
PROGRESS_WIDTH = 30


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="accuracy on labelled photos, and agreement with a second model",
        description="Top-1/top-5 accuracy, per-class errors and latency of a model on labelled photos, with the "
        "exact photo preprocessing. Labels come from the layout: DIR/<class>/*.jpg (class = ImageNet synset or "
        "one of the model's label names) or flat DIR/<synset>_*.JPEG files. With --vs, a second model runs on "
        "the same tensors: top-1 agreement and logit error. Exit status: 0 done, 1 some images failed, "
        "2 usage error.",
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="folder of labelled photos")
    add_model_arguments(p, required_help="required")
    p.add_argument("--vs", type=Path, metavar="MODEL2", help="a second .onnx model to compare with (e.g. int8)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="use N images spread evenly over the folder")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes")
    return p


def run(args: argparse.Namespace) -> int:
    from sbcrt.runtime.evaluation import check_comparable, evaluate, find_dataset

    model_path = resolve_model(args, required=True)
    if args.vs is not None and not args.vs.is_file():
        raise UsageError(f"model {args.vs}: no such file")
    if not args.folder.is_dir():  # before loading any model: a typo should not wait for it
        raise UsageError(
            f"{args.folder}: no such folder" if not args.folder.exists() else f"{args.folder}: not a folder"
        )
    model = load_classifier(args, model_path)
    other = load_classifier(args, args.vs) if args.vs is not None else None
    check_comparable(model, other)  # before scanning the folder: a wrong pair should fail at once
    dataset = find_dataset(args.folder, model.labels, limit=args.limit)
    if not args.quiet:
        for classifier in [model, other] if other is not None else [model]:
            for note in classifier.notes:
                print(f"note: {classifier.path.name}: {note}", file=sys.stderr)

    progress = ProgressBar() if not args.quiet and sys.stderr.isatty() else None
    interrupted = threading.Event()
    restore = stop_on_interrupt(interrupted)
    try:
        report = evaluate(dataset, model, other, progress=progress, stop=interrupted.is_set)
    finally:
        restore()
        if progress:
            progress.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    for failure in report["failures"] if not args.json else []:
        print(f"{failure['path']}: error: {failure['error']}", file=sys.stderr)
    if report.get("interrupted"):
        return 130  # the shell's code for SIGINT, after the summary of what was evaluated
    return 1 if report["failures"] else 0


def stop_on_interrupt(flag: threading.Event) -> Callable[[], None]:
    """The first SIGINT sets `flag` (the evaluation stops after the current image and its partial summary is
    printed); a second one interrupts at once. Returns a function restoring the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handle(_signum: int, _frame: object) -> None:
        flag.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handle)
    return lambda: signal.signal(signal.SIGINT, previous)


class ProgressBar:
    """`[=====>    ] 120/250` redrawn in place on stderr."""

    def __call__(self, done: int, total: int) -> None:
        filled = PROGRESS_WIDTH * done // max(total, 1)
        sys.stderr.write(f"\r[{'=' * filled}{' ' * (PROGRESS_WIDTH - filled)}] {done}/{total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * (PROGRESS_WIDTH + 24) + "\r")
        sys.stderr.flush()


def render(report: dict[str, Any]) -> str:
    data, model = report["dataset"], report["model"]
    layout = "<class>/ folders" if data["layout"] == "imagefolder" else "<synset>_* files"
    used = data["images_used"]
    lines = [
        f"{data['images_evaluated']} images in {data['classes']} classes ({layout}"
        + (f", {used} of {data['images_found']} by --limit" if used < data["images_found"] else "")
        + ")"
        + (f" - INTERRUPTED: the figures cover these, not all {used}" if report.get("interrupted") else "")
    ]
    entries = [("model", model)] + ([("vs", report["vs"])] if "vs" in report else [])
    for role, entry in entries:
        untrained = ", UNTRAINED" if entry["untrained"] else ""
        inference = entry["inference"]
        lines.append(
            f"{role + ':':6} {entry['path']} ({entry['architecture']}, {entry['precision']}{untrained})\n"
            f"        top-1 {entry['top1']:.3f} ({entry['top1_correct']}/{entry['images']})  "
            f"top-5 {entry['top5']:.3f} ({entry['top5_correct']}/{entry['images']})  "
            f"inference median {inference.get('median_ms', 0):.1f} ms, p90 {inference.get('p90_ms', 0):.1f} ms "
            f"({entry['threads']} thread{'s' if entry['threads'] > 1 else ''})"
        )
    pre = report["preprocess"]
    if pre:
        lines.append(f"decode + preprocess: median {pre['median_ms']:.1f} ms, p90 {pre['p90_ms']:.1f} ms per image")
    comparison = report.get("comparison")
    if comparison and "top1_agreement" in comparison:  # no compared image: an interrupt before the first
        c = comparison
        lines.append(
            f"agreement: top-1 {c['top1_agreement']:.3f}; logits max |diff| {c['max_abs_error']:.3g}, "
            f"relative {c['relative_error_median']:.3g} median / {c['relative_error_max']:.3g} max, "
            f"cosine {c['cosine_mean']:.5f} mean / {c['cosine_min']:.5f} min"
            + ("" if comparison["same_tensor"] else " (different preprocessing: each model got its own tensor)")
        )
    errors = model["per_class_errors"]
    if errors:
        more = ", --json lists all" if len(errors) > PER_CLASS_SHOWN else ""
        lines.append(f"classes with errors: {len(errors)} (worst first{more})")
        for entry in errors[:PER_CLASS_SHOWN]:
            predicted = ", ".join(entry["predicted"][:3]) + ("..." if len(entry["predicted"]) > 3 else "")
            lines.append(f"  {entry['label']}: {entry['errors']}/{entry['images']} wrong (as {predicted})")
    if report["failures"]:
        lines.append(f"{len(report['failures'])} images could not be read (listed on stderr)")
    return "\n".join(lines)
