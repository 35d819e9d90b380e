"""`sbcrt watch` on 1080p frames: per-stage latency, the loop's overhead over bare inference, reconnect time and
memory over a soak. Prints a table and writes JSON.

    python benchmarks/watch_latency.py [--model build/efficientnet_lite0.onnx] [--out build/watch_latency.json]

Without --model, EfficientNet-Lite0 is exported first (needs the export extras). Sources, all real:
- "video": a 1080p MJPG AVI made from the shared photos (capture = reading + decoding the 1080p frame);
- "stream": the same frames as an MJPEG-over-HTTP camera on loopback at 15 fps (capture = the frame's age when
  the loop takes it; the capture thread decodes in parallel).
Each run processes the frames through WatchLoop with a JSONL sink writing to a file (records, stats, events path
included). "bare" is `classifier.run` on a preprocessed tensor; "classify_frame" is the classifier's own
preprocess + inference + top-k. Reconnect: the camera stops, comes back after `--down` s on the same port; the
time from its return to the first record. Soak: a 640x480 stream at 60 fps through the model, RSS (VmRSS) after a
warm-up and at the end. Times are ms, medians (p90 in the table) after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info, shared_photos  # noqa: E402
from sbcrt.runtime.classifier import Classifier  # noqa: E402
from sbcrt.watch.loop import LoopOptions, WatchLoop  # noqa: E402
from sbcrt.watch.sinks import JsonlSink, Sink, StopWatching  # noqa: E402
from sbcrt.watch.sources import SourceOptions, parse_source  # noqa: E402
from tests.support.watch import MjpegServer, jpeg, photo_frames, rss_mb, write_video  # noqa: E402

STAGES = ("capture", "preprocess", "inference", "postprocess", "total")
SIZE_1080P = (1920, 1080)


class Collect(Sink):
    def __init__(self, total: int) -> None:
        self.records: list[dict] = []
        self.times: list[float] = []
        self.total = total

    def record(self, record, frame) -> None:
        self.records.append(record.to_json())
        self.times.append(time.monotonic())
        if len(self.records) >= self.total:
            raise StopWatching("enough")


def run_loop(source, classifier, sinks, *, limit_s: float = 600.0) -> None:
    loop = WatchLoop(source, classifier, sinks, options=LoopOptions(stats_interval_s=3600, stall_timeout_s=20))
    timer = threading.Timer(limit_s, loop.stop)
    timer.start()
    try:
        loop.run()
    finally:
        timer.cancel()


def stage_table(records: list[dict], warmup: int = 3) -> dict[str, dict[str, float]]:
    steady = records[warmup:]
    out = {}
    for stage in STAGES:
        values = [r["timing_ms"][stage] for r in steady]
        out[stage] = {"p50": round(statistics.median(values), 2), "p90": round(float(np.percentile(values, 90)), 2)}
    return out


def export_lite0(folder: Path) -> Path:
    from sbcrt.export.pipeline import export_model

    out = folder / "efficientnet_lite0.onnx"
    export_model("efficientnet_lite0", out, raw_graph_stats=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the .onnx model (default: export EfficientNet-Lite0)")
    parser.add_argument("--photos", type=Path, default=shared_photos())
    parser.add_argument("--frames", type=int, default=60, help="frames per latency run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--down", type=float, default=2.0, help="seconds the camera is off in a reconnect trial")
    parser.add_argument("--trials", type=int, default=3, help="reconnect trials")
    parser.add_argument("--soak", type=int, default=2000, help="frames in the soak")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "watch_latency.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sbcrt-watch-bench-"))
    model = args.model or export_lite0(work)
    classifier = Classifier(model, threads=args.threads, spin=False, cache_dir=False)
    photos = sorted(args.photos.glob("*.JPEG"))[:30]
    frames = photo_frames(photos, SIZE_1080P)
    report: dict = {
        "model": str(model),
        "architecture": classifier.config.architecture,
        "threads": classifier.session_info.threads,
        "frame_size": list(SIZE_1080P),
        "cpu": machine_info()["cpu"],
    }

    # 1. Video file, 1080p MJPG.
    clip = work / "1080p.avi"
    assert write_video(clip, frames * (args.frames // len(frames) + 1), fourcc="MJPG", fps=30)
    collect = Collect(args.frames)
    run_loop(parse_source(str(clip), SourceOptions()), classifier, [collect, JsonlSink(work / "video.jsonl")])
    report["video"] = stage_table(collect.records)
    wall = np.diff(collect.times[3:]) * 1000
    report["video"]["loop_period_ms"] = round(float(np.median(wall)), 2)
    # Time per frame outside the recorded stages: writing the JSONL line, stats, the loop's own bookkeeping.
    report["video"]["outside_stages_ms"] = round(report["video"]["loop_period_ms"] - report["video"]["total"]["p50"], 2)

    # 2. Bare inference and classify_frame on the same frames.
    tensors = [classifier.preprocess(f, bgr=True, fast=True) for f in frames[:10]]
    bare = []
    for i in range(args.frames):
        start = time.perf_counter()
        classifier.run(tensors[i % len(tensors)])
        bare.append((time.perf_counter() - start) * 1000)
    classify = [classifier.classify_frame(frames[i % len(frames)]).timing_ms["total"] for i in range(args.frames)]
    loop_work = [r["timing_ms"]["total"] - r["timing_ms"]["capture"] for r in collect.records[3:]]
    report["bare"] = {
        "run_ms": round(statistics.median(bare[3:]), 2),
        "classify_frame_ms": round(statistics.median(classify[3:]), 2),
        "loop_work_ms": round(statistics.median(loop_work), 2),
    }
    report["bare"]["loop_overhead_over_run_ms"] = round(report["bare"]["loop_work_ms"] - report["bare"]["run_ms"], 2)

    # 3. Live 1080p MJPEG stream at 15 fps on loopback.
    encoded = [jpeg(f, quality=90) for f in frames]
    server = MjpegServer(lambda n: encoded[n % len(encoded)], fps=15).start()
    try:
        collect = Collect(args.frames)
        source = parse_source(server.url, SourceOptions(timeout_s=5))
        run_loop(source, classifier, [collect, JsonlSink(work / "stream.jsonl")])
        report["stream"] = stage_table(collect.records)
        report["stream"]["camera_frames"] = source.frames_read
        report["stream"]["skipped_frames"] = source.frames_skipped
    finally:
        server.stop()

    # 4. Reconnect: the camera goes away for args.down s and comes back on the same port.
    report["reconnect"] = reconnect_trials(classifier, encoded, args.down, args.trials)

    # 5. Soak: RSS after a warm-up and after args.soak frames from a 640x480 stream.
    report["soak"] = soak(classifier, frames, args.soak)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwritten {args.out}")


def reconnect_trials(classifier, encoded: list[bytes], down_s: float, trials: int) -> dict:
    server = MjpegServer(lambda n: encoded[n % len(encoded)], fps=15).start()
    source = parse_source(server.url, SourceOptions(timeout_s=2))
    results = []

    class Trials(Sink):
        def __init__(self) -> None:
            self.count = 0
            self.in_trial = False
            self.back_at: float | None = None
            self.down_at = 0.0

        def record(self, record, frame) -> None:
            self.count += 1
            now = time.monotonic()
            if self.in_trial and self.back_at is not None:
                self.in_trial = False
                results.append(
                    {"from_return_s": round(now - self.back_at, 3), "from_drop_s": round(now - self.down_at, 3)}
                )
                self.back_at = None
                if len(results) == trials:
                    raise StopWatching("done")
            if self.count % 10 == 0 and not self.in_trial:
                self.in_trial = True
                self.down_at = time.monotonic()
                server.stop()

                def back() -> None:
                    server.start()
                    self.back_at = time.monotonic()

                threading.Timer(down_s, back).start()

    try:
        run_loop(source, classifier, [Trials()], limit_s=120)
    finally:
        server.stop()
    returns = [r["from_return_s"] for r in results]
    return {
        "down_s": down_s,
        "trials": results,
        "from_return_median_s": round(statistics.median(returns), 3) if returns else None,
    }


def soak(classifier, frames: list[np.ndarray], count: int) -> dict:
    small = [jpeg(cv2.resize(f, (640, 480), interpolation=cv2.INTER_AREA), quality=85) for f in frames]
    server = MjpegServer(lambda n: small[n % len(small)], fps=60).start()
    warmup = min(300, count // 5)
    marks: dict[str, float] = {}

    class Soak(Sink):
        def __init__(self) -> None:
            self.count = 0

        def record(self, record, frame) -> None:
            self.count += 1
            if self.count == warmup:
                marks["warm"] = rss_mb()
                marks["warm_t"] = time.monotonic()
            if self.count >= count:
                marks["end"] = rss_mb()
                marks["end_t"] = time.monotonic()
                raise StopWatching("done")

    start_rss = rss_mb()
    source = parse_source(server.url, SourceOptions(timeout_s=5))
    try:
        run_loop(source, classifier, [Soak(), JsonlSink(Path(tempfile.mkdtemp()) / "soak.jsonl")], limit_s=1800)
    finally:
        server.stop()
    return {
        "frames": count,
        "warmup_frames": warmup,
        "rss_start_mb": round(start_rss, 1),
        "rss_after_warmup_mb": round(marks["warm"], 1),
        "rss_end_mb": round(marks["end"], 1),
        "growth_mb": round(marks["end"] - marks["warm"], 2),
        "seconds": round(marks["end_t"] - marks["warm_t"], 1),
        "camera_frames": source.frames_read,
        "skipped_frames": source.frames_skipped,
    }


def print_table(report: dict) -> None:
    print(f"model {report['architecture']} ({report['threads']} threads) on {report['cpu']}, 1920x1080 frames")
    print(f"{'stage (ms)':<14}{'video p50':>11}{'video p90':>11}{'stream p50':>12}{'stream p90':>12}")
    for stage in STAGES:
        v, s = report["video"][stage], report["stream"][stage]
        print(f"{stage:<14}{v['p50']:>11.2f}{v['p90']:>11.2f}{s['p50']:>12.2f}{s['p90']:>12.2f}")
    b = report["bare"]
    print(
        f"\nbare classifier.run {b['run_ms']:.2f} ms, classify_frame {b['classify_frame_ms']:.2f} ms, loop work per "
        f"frame (total - capture) {b['loop_work_ms']:.2f} ms: overhead {b['loop_overhead_over_run_ms']:.2f} ms over "
        "run (1080p preprocessing included)"
    )
    v = report["video"]
    print(
        f"video loop period {v['loop_period_ms']:.2f} ms/frame, of which {v['outside_stages_ms']:.2f} ms outside "
        "the recorded stages (JSONL write, stats)"
    )
    st = report["stream"]
    print(f"stream: {st['camera_frames']} camera frames, {st['skipped_frames']} skipped (newest frame only)")
    r = report["reconnect"]
    print(f"reconnect after {r['down_s']} s down: first record {r['from_return_median_s']} s after the camera returned"
          f" (trials: {r['trials']})")  # fmt: skip
    s = report["soak"]
    print(
        f"soak: {s['frames']} frames 640x480 in {s['seconds']} s, RSS {s['rss_after_warmup_mb']} MB after "
        f"{s['warmup_frames']} -> {s['rss_end_mb']} MB: growth {s['growth_mb']} MB"
    )


if __name__ == "__main__":
    main()
