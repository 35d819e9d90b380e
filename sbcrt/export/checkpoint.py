"""Loading checkpoints without running their pickles.

Checkpoints are pickles, and a pickle can run any code. torch.load(weights_only=True) only rebuilds tensors
and plain containers; the one extra class we allow is argparse.Namespace, which the authors' training script
stores under "args". A checkpoint that needs anything else is refused before any of it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sbcrt.errors import SbcrtError

SAFE_GLOBALS = [argparse.Namespace]
# Where the weights sit inside a training checkpoint, by layout (authors' main.py, timm, DeiT-style EMA).
WEIGHT_ENTRIES = ("model", "state_dict", "model_ema", "state_dict_ema")
DDP_PREFIX = "module."


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    layout: str  # which entry the weights came from, or "bare"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint safely and return its weights as a flat state_dict without DDP prefixes."""
    path = Path(path)
    if not path.is_file():
        raise SbcrtError(f"checkpoint not found: {path}")
    _check_format(path)
    try:
        # warnings: torch comments on old pickle protocols; our error below says all that matters.
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the offending global in its message; keep just that part.
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise SbcrtError(
            f"refusing to unpickle {path}: it needs Python objects beyond tensors and argparse.Namespace "
            f"({reason}). Nothing in it was run; re-save it as a plain state_dict if you trust it."
        ) from None
    except Exception as exc:  # truncated file, a damaged zip, wrong format
        first_line = next((line for line in str(exc).splitlines() if line.strip()), "")[:200]
        raise SbcrtError(
            f"checkpoint {path} is damaged or not a PyTorch checkpoint ({type(exc).__name__}: {first_line})"
        ) from None

    layout, weights = _find_weights(obj, path)
    state_dict = {}
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise SbcrtError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key.removeprefix(DDP_PREFIX)] = value
    return Checkpoint(state_dict, sha256_of(path), layout)


def _check_format(path: Path) -> None:
    """torch.save writes a zip archive (since PyTorch 1.6) or, before that, a pickle (protocol 2+ starts with
    0x80): anything else (a text file, an image, a safetensors file) gets one clear line, not torch's IndexError."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise SbcrtError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise SbcrtError(
            f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
        )


def _find_weights(obj: object, path: Path) -> tuple[str, Mapping[str, object]]:
    if not isinstance(obj, Mapping):
        raise SbcrtError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
    for entry in WEIGHT_ENTRIES:
        if isinstance(obj.get(entry), Mapping):
            return entry, obj[entry]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "bare", obj
    raise SbcrtError(
        f"checkpoint {path} has no weights: expected a state_dict or one of the entries "
        f"{', '.join(WEIGHT_ENTRIES)}; found {', '.join(map(str, list(obj)[:8]))}"
    )


def num_classes_of(state_dict: Mapping[str, torch.Tensor], classifier_key: str) -> int:
    if classifier_key not in state_dict:
        raise SbcrtError(f"checkpoint has no {classifier_key!r}: is it for this architecture?")
    return int(state_dict[classifier_key].shape[0])


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str) -> None:
    """load_state_dict(strict=True), with mismatches reported by name instead of a traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if names:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            problems.append(f"{len(names)} {label}: {', '.join(names[:5])}{more}")
    if problems:
        raise SbcrtError(f"checkpoint does not fit {arch}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
