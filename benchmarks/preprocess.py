"""Camera-frame preprocessing at 1920x1080 and 3840x2160: cost of the fast path's variants vs the exact PIL
path, their largest pixel difference from it, (with --model) their top-1 agreement, and the fast path's cost
next to SBCFormer-XS's 1-thread inference. Prints a table and writes JSON.

    python benchmarks/preprocess.py --model build/lite0.onnx [--photos ../shared/data/imagenet-samples]

Frames are the photos enlarged to 1920x1080 (and 3840x2160) in two ways: "stretched" (the photo fills the
frame) and "camera" (aspect kept and centre-cropped, plus fixed sensor-like noise, sigma 4 levels, so the frame
has detail at full resolution where antialiasing matters). "cost" is the median time relative to the exact PIL
path on the same BGR frame (cvtColor + PIL resize + crop + normalise). Also: the same 1080p frames as JPEG files,
exact decoding vs draft (DCT-scaled) decoding + the fast path. Times are medians per frame after a warm-up;
exact-path logits are computed once per frame and reused. "max diff" is the largest difference from the exact
path's pixels, in 8-bit levels, over all frames. Everything runs on one thread (OpenCV and BLAS limited to 1,
--threads to change), so the times are CPU cost; PIL and onnxruntime with threads=1 use one anyway.

Variants: "matmul" does PIL's filter arithmetic as BLAS products (sbcrt/runtime/preprocess.py), "pil" calls PIL's
Image.resize(box=...) on the crop region; "gap 2" pre-shrinks 1080p frames by 2 with an area average first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/preprocess.py` as well as `python -m benchmarks.preprocess`

from benchmarks.common import shared_photos, take_turns  # noqa: E402
from sbcrt.runtime import preprocess  # noqa: E402
from sbcrt.runtime.preprocess import Preprocessing, preprocess_frame, preprocess_image  # noqa: E402

FRAME_SIZES = [(1920, 1080), (3840, 2160)]
XS_FRAMES = 100  # each takes ~20 ms: a median over many rides out a busy machine's slow spells


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


def fast_variant(resampler: str, gap: float):
    def run(frame: np.ndarray, spec: Preprocessing) -> np.ndarray:
        saved, preprocess.REDUCING_GAP = preprocess.REDUCING_GAP, gap
        try:
            return preprocess_frame(frame, spec, bgr=True, resampler=resampler)
        finally:
            preprocess.REDUCING_GAP = saved

    return run


def levels(tensor: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A (1, 3, H, W) model input back on the 0-255 scale of the pixels it came from."""
    std = np.asarray(spec.std, np.float32)[:, None, None]
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    return (tensor[0] * std + mean) * 255


def limited_threads(threads: int) -> contextlib.AbstractContextManager:
    """OpenCV and the BLAS behind numpy limited to `threads`, so times are CPU cost, not spread over cores."""
    cv2.setNumThreads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dev tool, not a dependency: set OPENBLAS_NUM_THREADS=1 instead
        print("threadpoolctl missing: numpy's BLAS may use several threads")
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an sbcrt .onnx model, for top-1 agreement")
    parser.add_argument("--photos", type=Path, default=shared_photos())
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (0 = all)")
    parser.add_argument("--timing-frames", type=int, default=30, help="frames to time each path on")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "benchmarks" / "preprocess.json")
    parser.add_argument("--threads", type=int, default=1, help="threads for OpenCV and BLAS (default 1)")
    parser.add_argument("--no-xs", action="store_true", help="skip the SBCFormer-XS inference comparison")
    args = parser.parse_args()
    with limited_threads(args.threads):
        run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> None:
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
    gap = preprocess.REDUCING_GAP
    paths = {
        "exact (PIL photo path, from BGR)": exact_from_bgr,
        f"fast, matmul, gap {gap:g} (default)": fast_variant("matmul", gap),
        f"fast, pil, gap {gap:g} (previous)": fast_variant("pil", gap),
        "fast, matmul, gap 2": fast_variant("matmul", 2.0),
        "fast, pil, gap 2": fast_variant("pil", 2.0),
    }
    rows = []
    for size in FRAME_SIZES:
        noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3)).round().astype(np.int16)
        variants = {"stretched": [stretched(s, size) for s in sources]}
        variants["camera"] = [camera_like(s, size, noise) for s in sources]
        timing_frames = variants["camera"][: args.timing_frames]
        # The exact path's pixels (8-bit, 150 kB a frame) and logits, computed once per frame.
        exact_pixels: dict[str, list[np.ndarray]] = {name: [] for name in variants}
        exact_logits: dict[str, list[np.ndarray]] = {name: [] for name in variants}
        for name, frames in variants.items():
            for frame in frames:
                tensor = exact_from_bgr(frame, spec)
                exact_pixels[name].append(np.rint(levels(tensor, spec)).astype(np.uint8))
                if classifier is not None:
                    exact_logits[name].append(classifier.run(tensor)[0])
        ms_by_path = interleaved_median_ms(
            {name: (lambda f, fn=fn: fn(f, spec)) for name, fn in paths.items()}, timing_frames
        )
        reference_ms = ms_by_path["exact (PIL photo path, from BGR)"]
        for name, fn in paths.items():
            ms = ms_by_path[name]
            row = {"frame": f"{size[0]}x{size[1]}", "path": name, "median_ms": ms, "cost_vs_exact": ms / reference_ms}
            if fn is not exact_from_bgr:
                max_diff = 0.0
                for variant, frames in variants.items():
                    same = []
                    for i, frame in enumerate(frames):
                        tensor = fn(frame, spec)
                        max_diff = max(max_diff, float(np.abs(levels(tensor, spec) - exact_pixels[variant][i]).max()))
                        if classifier is not None:
                            same.append(classifier.run(tensor)[0].argmax() == exact_logits[variant][i].argmax())
                    if classifier is not None:
                        row[f"top1_agreement_{variant}"] = float(np.mean(same))
                row["max_level_diff"] = round(max_diff, 3)
            rows.append(row)
        if size == (1920, 1080):
            variants_1080p = variants["camera"]
            rows.extend(jpeg_rows(timing_frames, spec, classifier, variants, exact_logits))

    print(
        f"Preprocessing camera frames to {spec.crop}: median ms over {args.timing_frames} frames; "
        f"top-1 agreement with the exact path over {len(photos)} photos"
    )
    print(
        f"{'frame':10} {'path':38} {'ms':>7} {'cost':>6} {'max diff':>8} {'agree stretched':>16} {'agree camera':>13}"
    )
    for row in rows:
        agree = [row.get(f"top1_agreement_{v}") for v in ("stretched", "camera")]
        agree_text = [f"{a:.3f}" if a is not None else "-" for a in agree]
        diff = f"{row['max_level_diff']:g}" if "max_level_diff" in row else "-"
        print(f"{row['frame']:10} {row['path']:38} {row['median_ms']:7.2f} {row['cost_vs_exact']:6.2f} {diff:>8} "
              f"{agree_text[0]:>16} {agree_text[1]:>13}")  # fmt: skip
    xs = None if args.no_xs else xs_inference_ratio(variants_1080p, spec, max(args.timing_frames, XS_FRAMES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"photos": len(photos), "model": str(args.model) if args.model else None, "rows": rows, "xs": xs},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


def interleaved_median_ms(fns: dict, items: list, clock=time.perf_counter) -> dict[str, float]:
    """Median ms of each function over `items`, the functions taking turns on each item (common.take_turns)."""
    runs = {name: (lambda turn, fn=fn: fn(items[turn])) for name, fn in fns.items()}
    times = take_turns(runs, len(items), warmup=1, clock=clock)
    return {name: statistics.median(values) for name, values in times.items()}


def xs_inference_ratio(frames: list[np.ndarray], spec: Preprocessing, count: int) -> dict:
    """The default fast path (1080p BGR frame -> tensor) next to SBCFormer-XS 1-thread inference on that tensor,
    timed in turns. XS is exported once with random weights (timing does not depend on them), cached."""
    from sbcrt import Classifier
    from sbcrt.export.pipeline import export_model

    path = REPO / "build" / "benchmarks" / "preprocess" / "sbcformer_xs.onnx"
    if not path.is_file():
        print(f"exporting SBCFormer-XS to {path} ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_model("sbcformer_xs", path, random_init=True, raw_graph_stats=False)
    xs = Classifier(path, threads=1)
    frames = frames[:count]
    tensor = preprocess_frame(frames[0], spec, bgr=True)
    fns = {"fast path": lambda f: preprocess_frame(f, spec, bgr=True), "xs": lambda f: xs.run(tensor)}
    result: dict = {"frames": len(frames)}
    # Wall time, and CPU time of this thread: onnxruntime with one thread, OpenCV limited to one and the fast
    # path's BLAS products (kept below OpenBLAS's threading size) all run on the calling thread.
    for kind, clock in (("wall", time.perf_counter), ("cpu", time.thread_time)):
        ms = interleaved_median_ms(fns, frames, clock)
        ratio = ms["fast path"] / ms["xs"]
        result[kind] = {"fast_path_ms": ms["fast path"], "xs_inference_ms": ms["xs"], "ratio": ratio}
        print(
            f"{kind:4} time: 1080p BGR frame -> tensor (default fast path) {ms['fast path']:.2f} ms, "
            f"SBCFormer-XS 1-thread inference {ms['xs']:.2f} ms: ratio {ratio:.1%} (target <= 20 %)"
        )
    return result


def jpeg_rows(frames, spec, classifier, variants, exact_logits) -> list[dict]:
    """The same 1080p frames as JPEG files: exact decode + preprocess vs draft (DCT-scaled) decode + fast path."""
    from sbcrt.runtime.images import open_image

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
