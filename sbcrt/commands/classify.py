"""`sbcrt classify`: classify image files, folders and globs with an ONNX model (human or JSON lines output)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sbcrt.commands.arguments import add_model_arguments, load_classifier, positive_int, resolve_model
from sbcrt.errors import SbcrtError, UsageError


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "classify",
        help="classify images with an ONNX model",
        description="Classify image files, folders (their images) and glob patterns. Preprocessing and labels "
        "come from the model's sbcrt metadata. Exit status: 0 all inputs classified, 1 some failed, 2 usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or quoted glob patterns")
    add_model_arguments(p, required_help="required")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per input per line")
    p.add_argument("--logits", action="store_true", help="add the raw model outputs to --json output")
    p.add_argument("-q", "--quiet", action="store_true", help="only results and errors: no notes, no speed line")
    p.add_argument(
        "--fast",
        action="store_true",
        help="approximate preprocessing: JPEG files decode at reduced scale (DCT scaling), ~4x cheaper at 1080p; "
        "top-1 agrees with the exact path on ~98-99 %% of photos (benchmarks/preprocess.py)",
    )
    pre = p.add_argument_group("preprocessing for models without sbcrt metadata (overrides the metadata)")
    pre.add_argument("--size", type=positive_int, help="centre crop size (the model's input size)")
    pre.add_argument("--resize", type=positive_int, help="shorter side before the crop (default size / 0.875)")
    pre.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel mean on [0, 1]")
    pre.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel std on [0, 1]")
    pre.add_argument("--labels", type=Path, help="class names, one per line")
    return p


def run(args: argparse.Namespace) -> int:
    if args.logits and not args.json:
        raise UsageError("--logits only applies to --json output")
    model = resolve_model(args, required=True)
    from sbcrt.runtime.image_files import expand_sources

    sources = expand_sources(args.inputs)  # before loading the model: a typo should not wait for it
    classifier = load_classifier(args, model)
    for warning in classifier.warnings:  # even with -q: results from such a model must not pass for real ones
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        for note in classifier.notes:
            print(f"note: {note}", file=sys.stderr)

    failed = 0
    timings: list[dict[str, float]] = []
    for source in sources:
        try:
            if source.error:
                raise SbcrtError(source.error)
            result = classifier.classify(source.name, fast=args.fast, top_k=args.top_k, source=source.name)
        except SbcrtError as exc:
            failed += 1
            report_failure(source.name, str(exc), as_json=args.json)
            continue
        except Exception as exc:  # an onnxruntime or memory failure on one input must not end the whole run
            failed += 1
            report_failure(
                source.name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", as_json=args.json
            )
            continue
        timings.append(result.timing_ms)
        if args.json:
            record = result.to_dict(logits=args.logits)
            record["timing_ms"] = {k: round(v, 3) for k, v in record["timing_ms"].items()}
            print(json.dumps(record), flush=True)
        else:
            t = result.timing_ms
            print(
                f"{source.name}: {result.summary()}   "
                f"(decode {t['decode']:.1f} ms, pre {t['preprocess']:.1f} ms, infer {t['inference']:.1f} ms)",
                flush=True,
            )

    if not args.json and not args.quiet and timings:
        mean = {k: sum(t[k] for t in timings) / len(timings) for k in ("decode", "preprocess", "inference")}
        print(
            f"Speed: {mean['decode']:.1f} ms decode, {mean['preprocess']:.1f} ms pre, {mean['inference']:.1f} ms "
            f"inference per image at shape {tuple(classifier.input_shape)}"
        )
    if failed and not args.json and not args.quiet:
        print(f"{failed} of {len(sources)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def report_failure(source: str, message: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"source": source, "error": message}), flush=True)
    else:
        print(f"{source}: error: {message}", file=sys.stderr, flush=True)
