"""Camera-frame preprocessing at 1920x1080: cost of the fast path vs the exact PIL path, and (with --model)
their top-1 agreement. Prints a table and writes JSON.

    python benchmarks/preprocess.py --model build/efficientnet_lite0.onnx [--photos ../shared/data/imagenet-samples]

Frames are the photos enlarged to 1920x1080 (and 3840x2160) in two ways: "stretched" (the photo fills the
frame) and "camera" (aspect kept and centre-cropped, plus fixed sensor-like noise, sigma 4 levels, so the frame
has detail at full resolution where antialiasing matters). "cost" is the median time relative to the exact PIL
path on the same BGR frame (cvtColor + PIL resize + crop + normalise). Also: the same 1080p frames as JPEG files,
exact decoding vs draft (DCT-scaled) decoding + the fast path. Times are medians per frame after a warm-up;
exact-path logits are computed once per frame and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from sbcrt import preprocess
from sbcrt.preprocess import Preprocessing, preprocess_frame, preprocess_image

REPO = Path(__file__).resolve().parents[1]
FRAME_SIZES = [(1920, 1080), (3840, 2160)]


def stretched(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC)


def camera_like(bgr: np.ndarray, size: tuple[int, int], noise: np.ndarray) -> np.ndarray:
    h, w = bgr.shape[:2]
    scale = max(size[0] / w, size[1] / h)
    big = cv2.resize(
        bgr, (max(size[0], round(w * scale)), max(size[1], round(h * scale))), interpolation=cv2.INTER_CUBIC
    )
    top, left = (big.shape[0] - size[1]) // 2, (big.shape[1] - size[0]) // 2
    frame = big[top : top + size[1], left : left + size[0]].astype(np.int16) + noise
    return np.clip(frame, 0, 255).astype(np.uint8)


def median_ms(fn, items) -> float:
    fn(items[0])  # warm-up (lazy imports, allocator)
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def exact_from_bgr(frame: np.ndarray, spec: Preprocessing) -> np.ndarray:
    return preprocess_image(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)), spec)


def fast_with_gap(gap: float):
    def run(frame: np.ndarray, spec: Preprocessing) -> np.ndarray:
        saved, preprocess.REDUCING_GAP = preprocess.REDUCING_GAP, gap
        try:
            return preprocess_frame(frame, spec, bgr=True)
        finally:
            preprocess.REDUCING_GAP = saved

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an sbcrt .onnx model, for top-1 agreement")
    parser.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "imagenet-samples")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (0 = all)")
    parser.add_argument("--timing-frames", type=int, default=30, help="frames to time each path on")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "benchmarks" / "preprocess.json")
    args = parser.parse_args()

    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    photos = photos[: args.limit] if args.limit else photos
    classifier = None
    if args.model:
        from sbcrt import Classifier

        classifier = Classifier(args.model)
        spec = classifier.preprocessing
    else:
        spec = Preprocessing()
    sources = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in photos]
    paths = {
        "exact (PIL photo path, from BGR)": exact_from_bgr,
        f"fast, gap {preprocess.REDUCING_GAP:g} (default)": fast_with_gap(preprocess.REDUCING_GAP),
        "fast, gap 2 (pre-shrink at 1080p)": fast_with_gap(2.0),
    }
    rows = []
    for size in FRAME_SIZES:
        noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3)).round().astype(np.int16)
        variants = {"stretched": [stretched(s, size) for s in sources]}
        variants["camera"] = [camera_like(s, size, noise) for s in sources]
        timing_frames = variants["camera"][: args.timing_frames]
        reference_ms = median_ms(lambda f: exact_from_bgr(f, spec), timing_frames)
        exact_logits = {}
        if classifier is not None:
            exact_logits = {
                name: [classifier.run(exact_from_bgr(f, spec))[0] for f in frames] for name, frames in variants.items()
            }
        for name, fn in paths.items():
            ms = reference_ms if fn is exact_from_bgr else median_ms(lambda f, fn=fn: fn(f, spec), timing_frames)
            row = {"frame": f"{size[0]}x{size[1]}", "path": name, "median_ms": ms, "cost_vs_exact": ms / reference_ms}
            if classifier is not None and fn is not exact_from_bgr:
                for variant, frames in variants.items():
                    same = [
                        classifier.run(fn(f, spec))[0].argmax() == e.argmax()
                        for f, e in zip(frames, exact_logits[variant], strict=True)
                    ]
                    row[f"top1_agreement_{variant}"] = float(np.mean(same))
            rows.append(row)
        if size == (1920, 1080):
            rows.extend(jpeg_rows(timing_frames, spec, classifier, variants, exact_logits))

    print(
        f"Preprocessing camera frames to {spec.crop}: median ms over {args.timing_frames} frames; "
        f"top-1 agreement with the exact path over {len(photos)} photos"
    )
    print(f"{'frame':10} {'path':38} {'ms':>7} {'cost':>6} {'agree stretched':>16} {'agree camera':>13}")
    for row in rows:
        agree = [row.get(f"top1_agreement_{v}") for v in ("stretched", "camera")]
        agree_text = [f"{a:.3f}" if a is not None else "-" for a in agree]
        print(f"{row['frame']:10} {row['path']:38} {row['median_ms']:7.2f} {row['cost_vs_exact']:6.2f} "
              f"{agree_text[0]:>16} {agree_text[1]:>13}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"photos": len(photos), "model": str(args.model) if args.model else None, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


def jpeg_rows(frames, spec, classifier, variants, exact_logits) -> list[dict]:
    """The same 1080p frames as JPEG files: exact decode + preprocess vs draft (DCT-scaled) decode + fast path."""
    from sbcrt.images import open_image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, frame in enumerate(frames):
            files.append(Path(tmp) / f"{i}.jpg")
            cv2.imwrite(str(files[-1]), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        draft = round(spec.resize_size * 2)
        exact_ms = median_ms(lambda p: preprocess_image(open_image(p), spec), files)
        fast_ms = median_ms(
            lambda p: preprocess_frame(np.asarray(open_image(p, draft_shorter_side=draft)), spec, bgr=False), files
        )
        rows.append(
            {"frame": "1920x1080", "path": "JPEG file: exact decode + pre", "median_ms": exact_ms, "cost_vs_exact": 1.0}
        )
        row = {
            "frame": "1920x1080",
            "path": "JPEG file: draft decode + fast",
            "median_ms": fast_ms,
            "cost_vs_exact": fast_ms / exact_ms,
        }
        if classifier is not None:
            for variant, all_frames in variants.items():
                same = []
                for frame in all_frames:
                    ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                    data = encoded.tobytes()
                    exact = classifier.run(preprocess_image(open_image(data), spec))[0].argmax()
                    fast = classifier.run(
                        preprocess_frame(np.asarray(open_image(data, draft_shorter_side=draft)), spec, bgr=False)
                    )[0].argmax()
                    same.append(exact == fast)
                row[f"top1_agreement_{variant}"] = float(np.mean(same))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
