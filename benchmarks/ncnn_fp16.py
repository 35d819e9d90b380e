"""Accuracy of the ncnn engine's --fp16 on a Pi 5's CPU: top-1 on the shared labelled photos, fp16 under QEMU as
a Cortex-A76 (half-precision arithmetic) against fp32 on this machine.

    python benchmarks/ncnn_fp16.py --model lite0.onnx [--limit 125] [--jobs 2] [--cpu cortex-a76] [--json out.json]

MODEL needs its .ncnn beside it (`sbcrt export ... --engine ncnn`). Both sides run sbcrt's own Classifier with the
ncnn engine on the same photos (exact preprocessing): fp32 here (its logits match the Pi's fp32 to ~1e-6 x the
logit scale: tests/arm64/arm64_parity.py), fp16 in the emulated userland of `make test-arm64`. Emulated fp16
inference is slow (~8-15 s per Lite0 image: QEMU emulates half precision in software), so --jobs splits the photos
over that many emulated processes, and --limit takes N photos spread evenly over the set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.data import shared_photos  # noqa: E402


def classify(model: Path, photos: list[str], *, fp16: bool) -> list[dict]:
    """Top-1 and logits of each photo with the ncnn engine (runs on either side)."""
    import numpy as np

    from sbcrt.runtime.classifier import Classifier

    classifier = Classifier(model, engine="ncnn", fp16=fp16, threads=1, warmup=False)
    rows = []
    for photo in photos:
        result = classifier.classify(photo, top_k=1)
        rows.append({"photo": photo, "top1": result.top1.index, "logits": np.asarray(result.logits).tolist()})
    return rows


def guest(argv: list[str]) -> int:
    model, listing, out = argv
    photos = json.loads(Path(listing).read_text())
    Path(out).write_text(json.dumps(classify(Path(model), photos, fp16=True)))
    return 0


def emulated_fp16(model: Path, photos: list[str], cpu: str, jobs: int) -> list[dict]:
    """classify(fp16=True) in the emulated userland as `cpu`: photo i goes to guest i % jobs; rows in photo order."""
    shares = [photos[i::jobs] for i in range(jobs)]

    def run(index: int, tmp: Path) -> list[dict]:
        listing, out = tmp / f"photos{index}.json", tmp / f"fp16-{index}.json"
        listing.write_text(json.dumps(shares[index]))
        command = [str(REPO / "tools" / "arm64" / "run.sh"), "--cpu", cpu, "--", "python3", __file__]
        command += ["--guest", str(model.resolve()), str(listing), str(out)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        return json.loads(out.read_text())

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda i: run(i, Path(tmp)), range(jobs)))
    rows: list[dict] = [{}] * len(photos)
    for index, share in enumerate(results):
        rows[index::jobs] = share
    return rows


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from sbcrt.runtime.classifier import Classifier
    from sbcrt.runtime.evaluation import find_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="photos spread evenly over the set (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="emulated processes run at once (default 1)")
    parser.add_argument("--cpu", default="cortex-a76")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    labels = Classifier(args.model, engine="ncnn", threads=1, warmup=False).labels
    dataset = find_dataset(shared_photos(), labels, limit=args.limit)
    photos = [str(image.path) for image in dataset.images]
    truth = [image.label for image in dataset.images]
    started = time.monotonic()
    fp32 = classify(args.model, photos, fp16=False)
    fp16 = emulated_fp16(args.model, photos, args.cpu, args.jobs)
    top1_fp32 = sum(r["top1"] == t for r, t in zip(fp32, truth, strict=True)) / len(photos)
    top1_fp16 = sum(r["top1"] == t for r, t in zip(fp16, truth, strict=True)) / len(photos)
    agree = sum(a["top1"] == b["top1"] for a, b in zip(fp32, fp16, strict=True)) / len(photos)
    diffs = [
        float(np.abs(np.subtract(a["logits"], b["logits"])).max() / np.abs(a["logits"]).max())
        for a, b in zip(fp32, fp16, strict=True)
    ]
    report = {
        "model": str(args.model),
        "cpu": args.cpu,
        "images": len(photos),
        "top1_fp32": top1_fp32,
        "top1_fp16": top1_fp16,
        "top1_agreement": agree,
        "max_relative_logit_diff": max(diffs),
        "median_relative_logit_diff": float(np.median(diffs)),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(
        f"{args.model.name} on {len(photos)} photos: top-1 fp32 {100 * top1_fp32:.1f} %, fp16 ({args.cpu}) "
        f"{100 * top1_fp16:.1f} % ({100 * (top1_fp16 - top1_fp32):+.1f} points); top-1 agreement "
        f"{100 * agree:.1f} %; logit difference / logit scale: median {report['median_relative_logit_diff']:.2e}, "
        f"max {report['max_relative_logit_diff']:.2e}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        raise SystemExit(guest(sys.argv[2:]))
    raise SystemExit(main())
