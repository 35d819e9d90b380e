"""Classify the same inputs with sbcrt's Classifier and save everything needed to compare two machines.

    python3 classify_inputs.py --model NAME=PATH... [--photo PATH...] [--frame NAME=FRAME.npy...] --out DIR

Runs unchanged on x86 (the test venv) and in the emulated arm64 userland (tools/arm64/run.sh), so both
sides take exactly the same code path: the photos through `Classifier.classify` (the exact reference
preprocessing), the frames (HxWx3 BGR uint8) through `Classifier.classify_frame` (the camera fast path).
Writes DIR/results.npz (the model input tensor and the logits for each model and input) and DIR/platform.json
(what this machine and onnxruntime report about the CPU, and the engine each model ran on: the default, auto,
as `sbcrt classify` picks it). Needs only the runtime's dependencies (and ncnn for a model with a .ncnn file).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import numpy as np

# Linux arm64 AT_HWCAP / AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h): what the kernel (here QEMU)
# says the CPU can do. onnxruntime's CPU detection (pytorch/cpuinfo) reads these on Linux to pick kernels.
AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_BITS = (
    "fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
    "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
    "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg",
)  # fmt: skip
HWCAP2_BITS = (
    "dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
    "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti",
)  # fmt: skip


def hardware_capabilities() -> list[str]:
    """The HWCAP feature names of this process's CPU (arm64 only; empty elsewhere)."""
    if platform.machine() != "aarch64":
        return []
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    found = []
    for names, kind in ((HWCAP_BITS, AT_HWCAP), (HWCAP2_BITS, AT_HWCAP2)):
        bits = libc.getauxval(kind)
        found += [name for i, name in enumerate(names) if bits >> i & 1]
    return found


def platform_report(threads: int) -> dict:
    import onnxruntime as ort

    from sbcrt.runtime.session import cpu_info

    cpu = cpu_info()
    return {
        "machine": platform.machine(),
        "cpu_model": cpu.model,
        "cpuinfo_features": list(cpu.features),
        "notable_features": cpu.notable_features,
        "hwcap": hardware_capabilities(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_device": ort.get_device(),
        "providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--photo", action="append", default=[], metavar="PATH")
    parser.add_argument("--frame", action="append", default=[], metavar="NAME=NPY")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from sbcrt import Classifier

    arrays: dict[str, np.ndarray] = {}
    timings: dict[str, dict[str, float]] = {}
    std: dict[str, list[float]] = {}  # to turn tensor differences back into 8-bit pixel steps
    engines: dict[str, str] = {}  # which engine `--engine auto` picked for each model on this machine
    started = time.perf_counter()
    for spec in args.model:
        name, _, path = spec.partition("=")
        # No graph cache: each run optimises the graph itself, for this CPU, as a first start on a Pi does.
        classifier = Classifier(path, threads=args.threads, cache_dir=False, warmup=False)
        std[name] = list(classifier.preprocessing.std)
        engines[name] = classifier.engine.name
        for photo in args.photo:
            key = f"{name}/{Path(photo).name}"
            arrays[f"{key}/tensor"] = classifier.preprocess(photo)
            result = classifier.classify(photo)
            arrays[f"{key}/logits"] = result.logits
            timings[key] = result.timing_ms
        for frame_spec in args.frame:
            frame_name, _, frame_path = frame_spec.partition("=")
            frame = np.load(frame_path)
            key = f"{name}/{frame_name}"
            arrays[f"{key}/tensor"] = classifier.preprocess(frame, bgr=True, fast=True)
            result = classifier.classify_frame(frame, bgr=True)
            arrays[f"{key}/logits"] = result.logits
            timings[key] = result.timing_ms
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "results.npz", **arrays)
    report = platform_report(args.threads)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["timing_ms"] = timings
    report["std"] = std
    report["engines"] = engines
    (args.out / "platform.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
