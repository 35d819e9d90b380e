"""The arguments the commands share: number types, path types, --model and the session flags, and the model
loading they steer. argparse only at import time: `sbcrt --help` must stay light."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sbcrt.errors import UsageError
from sbcrt.runtime.engines import ENGINES

if TYPE_CHECKING:
    from sbcrt.runtime.classifier import Classifier

MODEL_ENV = "SBCRT_MODEL"

# The library's setting names whose flag is not "--" + the name with "_" and "." as "-" (errors.SettingError).
FLAGS = {
    "calib_dir": "--calib",
    "cooldown_s": "--cooldown",
    "labels_path": "--labels",
    "http.address": "--http",
    "mqtt.url": "--mqtt",
    "mqtt.ca_file": "--mqtt-ca",
}


def flag_of(setting: str) -> str:
    """The command-line flag that sets a library setting: `save_max` -> `--save-max`, `mqtt.url` -> `--mqtt`."""
    return FLAGS.get(setting) or "--" + setting.replace("_", "-").replace(".", "-")


def number(kind: type[int] | type[float], *, minimum: float = 1, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a whole number (`int`) or a finite number (`float`) at least `minimum` (above it when
    `strict`). One factory, so every command words a bad number the same way."""
    if kind is int:

        def parse_int(text: str) -> int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
            if value < minimum or (strict and value == minimum):
                raise argparse.ArgumentTypeError(f"must be at least {int(minimum) + strict}, got {value}")
            return value

        return parse_int

    def parse_float(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        # `not value >= minimum` also refuses NaN, which compares false with everything.
        if not value >= minimum or (strict and value == minimum) or math.isinf(value):
            if strict and minimum == 0:
                raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
            if minimum == 0:
                raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {minimum:g}, got {text}")
        return value

    return parse_float


positive_int = number(int)
positive_float = number(float, minimum=0, strict=True)
non_negative_float = number(float, minimum=0)


# Path-valued options declare what the command does with the path, so `sbcrt service` can find every path in a
# watch command line (to make it absolute, and to let the service write where it writes) from the parser itself.
def output_file(text: str) -> Path:
    """A file the command writes (its folder must be writable)."""
    return Path(text)


def output_folder(text: str) -> Path:
    """A folder the command writes into."""
    return Path(text)


PATH_TYPES: tuple[Callable[[str], Path], ...] = (Path, output_file, output_folder)


def add_model_arguments(
    p: argparse.ArgumentParser, *, required_help: str, threads: bool = True, spin: bool = True
) -> None:
    """--model and the session flags, shared by every command that runs a model. `bench` sweeps a list of
    thread counts, so declares its own --threads (threads=False); `watch` never spins (spin=False: its capture
    thread shares the cores, and spinning inference threads would starve it)."""
    p.add_argument(
        "-m", "--model", type=Path, help=f"the .onnx (or .ncnn) model ({required_help}; default: ${MODEL_ENV})"
    )
    if threads:
        p.add_argument("--threads", type=positive_int, help="inference threads (default: one per physical core)")
    if spin:
        p.add_argument(
            "--no-spin",
            action="store_true",
            help="idle threads sleep instead of spinning (when other work shares the CPU)",
        )
    else:
        p.set_defaults(no_spin=True)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the optimised-graph cache")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): ncnn on 64-bit ARM when MODEL.ncnn (sbcrt export --engine ncnn) and the ncnn "
        "package are there, else onnxruntime",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="ncnn engine: half-precision storage and arithmetic where the CPU has it (Pi 5)",
    )


def resolve_model(args: argparse.Namespace, *, required: bool) -> Path | None:
    model = args.model or (Path(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else None)
    if model is None and required:
        raise UsageError(f"no model: pass --model FILE.onnx or set {MODEL_ENV}")
    return model


def load_classifier(
    args: argparse.Namespace, model: Path, *, warmup: bool = True, cache: bool | None = None
) -> Classifier:
    """The Classifier the flags describe. cache=False overrides --no-cache (a check that must leave no file)."""
    from sbcrt.runtime.classifier import Classifier
    from sbcrt.runtime.metadata import read_labels_file

    labels = None
    if getattr(args, "labels", None):
        try:
            labels = read_labels_file(str(args.labels))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"cannot read labels file {args.labels}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    use_cache = not args.no_cache if cache is None else cache
    return Classifier(
        model,
        threads=args.threads,
        spin=not args.no_spin,
        cache_dir=None if use_cache else False,
        warmup=warmup,
        size=getattr(args, "size", None),
        resize_size=getattr(args, "resize", None),
        mean=getattr(args, "mean", None),
        std=getattr(args, "std", None),
        labels=labels,
        engine=args.engine,
        fp16=args.fp16,
    )
