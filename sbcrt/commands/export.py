"""`sbcrt export`: PyTorch weights to one fused, verified, self-describing ONNX file (workstation side)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sbcrt.errors import UsageError
from sbcrt.runtime.engines import ENGINE_NAMES

EXPORT_NEEDS = 'the export stage needs PyTorch and ONNX: pip install "sbcrt[export]"'
# The packages of the `export` extra: only their absence means "install the extra"; any other ImportError is a
# bug or a broken install and must show as itself.
EXPORT_PACKAGES = ("torch", "onnx", "onnxscript")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (needs sbcrt[export])",
        description="Export trained PyTorch weights to one ONNX file with BatchNorm folded, the model's "
        "preprocessing and labels in its metadata, checked against PyTorch before it is written.",
    )
    p.add_argument("arch", help="architecture: sbcformer_xs, sbcformer_s, sbcformer_b, sbcformer_l, efficientnet_lite0")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .onnx file to write")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="a .pth checkpoint (authors', bare, DDP or timm layout)")
    weights.add_argument(
        "--random-init", action="store_true", help="seeded random weights, for speed tests only (marked untrained)"
    )
    p.add_argument("--labels", type=Path, help="class names, one per line (default: the 1000 ImageNet classes)")
    p.add_argument("--verify-images", type=Path, help="a folder of photos to compare ONNX and PyTorch on")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset, >= 17 (default 20: GELU is one op from opset 20)")
    p.add_argument("--int8", action="store_true", help="write a static int8 (QDQ) model, calibrated on --calib")
    p.add_argument("--calib", type=Path, help="a folder of photos like the ones the model will see (for --int8)")
    p.add_argument("--calib-count", type=int, default=100, help="photos used for calibration (default 100)")
    p.add_argument(
        "--keep-fp32",
        action="append",
        metavar="NODE",
        help="an ONNX node name to leave in fp32 with --int8 (repeatable; the stem and classifier always are)",
    )
    p.add_argument(
        "--target",
        choices=("any", "arm64"),
        default="any",
        help="arm64: depthwise convolutions in the forms onnxruntime's aarch64 kernels run with fewer "
        "instructions (a Pi; fp32 only; slower on x86). Default: the graph for any CPU",
    )
    p.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default="onnxruntime",
        help="ncnn: also write MODEL.ncnn beside the .onnx file (pnnx's conversion, checked against PyTorch), "
        "which the runtime picks on 64-bit ARM. Default: the .onnx file only",
    )
    p.add_argument(
        "--no-rewrite",
        action="store_true",
        help="keep the authors' graph structure (still folded): for comparing against sbcrt's layout rewrites",
    )
    return p


def run(args: argparse.Namespace) -> int:
    if args.int8 and args.calib is None:  # before importing torch: a usage error should not wait for it
        raise UsageError("--int8 needs --calib DIR: photos like the ones the model will see, for calibration")
    from sbcrt.runtime.atomic import check_writable

    check_writable(args.output)  # before the seconds torch takes to import (the library checks again)
    try:
        from sbcrt.export.pipeline import export_model
    except ModuleNotFoundError as exc:  # a runtime-only install (the Pi) has no torch/onnx
        if (exc.name or "").split(".")[0] not in EXPORT_PACKAGES:
            raise
        raise UsageError(f"{EXPORT_NEEDS} ({exc.name} is missing)") from None
    report = export_model(
        args.arch,
        args.output,
        checkpoint=args.checkpoint,
        random_init=args.random_init,
        labels_path=args.labels,
        verify_images=args.verify_images,
        opset=args.opset,
        rewrite=not args.no_rewrite,
        target=args.target,
        engine=args.engine,
        int8=args.int8,
        calib_dir=args.calib,
        calib_count=args.calib_count,
        keep_fp32=args.keep_fp32,
    )
    print(report.render())
    return 0
