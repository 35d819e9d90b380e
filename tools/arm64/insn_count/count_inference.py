"""Guest side of the instruction counter: runs inside the emulated arm64 userland, under QEMU with the
insn_count plugin (benchmarks/arm_count.py starts it). Opens a model the way sbcrt does on a Pi, with the
engine `sbcrt classify --engine E` picks there (sbcrt.runtime.engines; default auto: ncnn when MODEL.ncnn is
beside the file) and a given number of threads, runs it `--warmup` times uncounted, then `--repeat` times, each
run bracketed by region markers the plugin counts between.

    python3 count_inference.py MODEL.onnx [--threads 1] [--warmup 2] [--repeat 1] [--engine auto] [--fp16]
        [--logits OUT.npy]

onnxruntime: its session (sbcrt.runtime.session.create_session) with I/O binding, so only onnxruntime's run is
counted. ncnn: `Classifier.run`, the call `sbcrt classify` makes per image (a new extractor, input, extract).

Prints one JSON line describing what ran (inputs, onnxruntime version). Only onnxruntime, numpy and ctypes:
it also runs on a real Pi, where the markers are harmless failing system calls.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from collections.abc import Callable
from typing import TypeVar

# Nothing but the inference may run in the guest, so these go before numpy and onnxruntime load: onnxruntime's
# telemetry uploader (1.32 on Linux) wakes every few seconds in its own threads to resolve its collector's host
# name, and numpy's OpenBLAS starts a worker thread per CPU.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

# Shared with insn_count.c. An unused system call number: Linux and QEMU answer ENOSYS and do nothing else;
# the plugin sees it on entry, with its arguments.
T = TypeVar("T")

REGION_SYSCALL = 0x5BC0
REGION_MAGIC = 0x5BC0C0A7C0417E57
REGION_BEGIN = 1
REGION_END = 2

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class RegionMarker:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong]

    def begin(self) -> None:
        self._syscall(REGION_SYSCALL, REGION_MAGIC, REGION_BEGIN)

    def end(self) -> None:
        self._syscall(REGION_SYSCALL, REGION_MAGIC, REGION_END)


def run_counted(infer: Callable[[], T], warmup: int, repeat: int) -> T:
    """The peers' guest scripts: `warmup` uncounted calls of `infer`, then `repeat` calls each bracketed by the
    markers the plugin counts between; returns the last call's result (the logits to check)."""
    for _ in range(warmup):
        out = infer()
    marker = RegionMarker()
    gc.disable()  # a collection would land inside a counted run when the allocation count says so
    for _ in range(repeat):
        marker.begin()
        out = infer()
        marker.end()
    return out


def fixed_input(shape: list, onnx_type: str, seed: int) -> np.ndarray:
    """A deterministic input; a dynamic dimension (batch) is 1. The values do not change which instructions
    run (no data-dependent kernels), but fixed ones keep every run identical anyway."""
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    dtype = ONNX_TO_NUMPY.get(onnx_type)
    if dtype is None:
        raise SystemExit(f"count_inference: input type {onnx_type} not supported")
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims).astype(dtype)
    return rng.integers(0, 100, dims).astype(dtype)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "ncnn"))
    parser.add_argument("--fp16", action="store_true", help="the ncnn engine's --fp16")
    parser.add_argument("--logits", help="save the last counted run's output here (ncnn)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the warm-up allocates the outputs the counted runs reuse)")

    from sbcrt.runtime.engines import resolve

    if resolve(args.model, args.engine)[0] == "ncnn":
        return count_ncnn_engine(args)
    import onnxruntime as ort

    from sbcrt.runtime.session import create_session

    # Graph cache off: the first start optimises the graph exactly as a cached start would load it, and
    # nothing is written into the user's cache from an emulated CPU.
    session, info = create_session(args.model, threads=args.threads, cache_dir=False)
    # I/O binding with tensors allocated once: the counted region is onnxruntime's run, not numpy conversions.
    binding = session.io_binding()
    inputs = {}
    for i, node in enumerate(session.get_inputs()):
        value = fixed_input(node.shape, node.type, args.seed + i)
        inputs[node.name] = list(value.shape)
        binding.bind_ortvalue_input(node.name, ort.OrtValue.ortvalue_from_numpy(value))
    for node in session.get_outputs():
        binding.bind_output(node.name, "cpu")
    # Allocations and onnxruntime's memory pattern settle over the first runs (measured: the first run after a
    # single warm-up still clears a 64 KB buffer the later ones do not).
    for _ in range(args.warmup):
        session.run_with_iobinding(binding)
    # Bind the outputs the warm-up allocated, so counted runs reuse them instead of allocating.
    for node, value in zip(session.get_outputs(), binding.get_outputs(), strict=True):
        binding.bind_ortvalue_output(node.name, value)

    marker = RegionMarker()
    gc.disable()  # a collection would land inside a counted run when the allocation count says so
    for _ in range(args.repeat):
        marker.begin()
        session.run_with_iobinding(binding)
        marker.end()
    print(
        json.dumps(
            {
                "engine": "onnxruntime",
                "onnxruntime": ort.__version__,
                "providers": info.providers,
                "threads": info.threads,
                "inputs": inputs,
                "warmup": args.warmup,
                "repeat": args.repeat,
            }
        )
    )
    return 0


def count_ncnn_engine(args: argparse.Namespace) -> int:
    """The ncnn engine through sbcrt's own Classifier, as `sbcrt classify --model MODEL` runs it."""
    from sbcrt.runtime.classifier import Classifier

    classifier = Classifier(
        args.model, threads=args.threads, cache_dir=False, warmup=False, engine=args.engine, fp16=args.fp16
    )
    spec = classifier.engine.inputs[0]
    value = fixed_input(spec.shape, spec.type, args.seed)
    out = run_counted(lambda: classifier.run(value), args.warmup, args.repeat)
    if args.logits:
        np.save(args.logits, out)
    info = classifier.session_info
    print(
        json.dumps(
            {
                "engine": classifier.engine.name,
                "file": str(classifier.engine.path),
                "providers": info.providers,
                "threads": info.threads,
                "notes": info.notes,
                "inputs": {spec.name: list(value.shape)},
                "warmup": args.warmup,
                "repeat": args.repeat,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
