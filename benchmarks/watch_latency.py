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

--http (`--http-only` runs just this part): what `watch --http` costs. `python -m sbcrt watch` on the 1080p video, as
a user runs it, alternately without and with `--http` while a client (this process) polls every 100 ms: each tick
/api/latest, /snapshot.jpg and /metrics, every tenth tick also the page, /api/stats, /api/history and /api/events
(heavier than the page itself, which polls once a second). Processed fps (from the records' times) and inference
p50 of each pair give a ratio with/without; peak RSS (the child's VmHWM, read before it is stopped: wait4's
ru_maxrss would report this process's size, inherited through fork) for each. Run on the benchmark's model and on
`--rss-model` (SBCFormer-B: `sbcrt export sbcformer_b --random-init -o ...`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
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
    parser.add_argument("--http-only", action="store_true", help="only the --http overhead and memory runs")
    parser.add_argument("--http-frames", type=int, default=300, help="video frames per --http run")
    parser.add_argument("--http-pairs", type=int, default=3, help="runs without/with --http, alternated")
    parser.add_argument("--rss-model", type=Path, help="a second model for the --http runs (SBCFormer-B)")
    args = parser.parse_args()

    photos = sorted(args.photos.glob("*.JPEG"))[:30]
    if not photos:
        parser.error(f"--photos {args.photos}: no *.JPEG photos (the shared ImageNet photos: set SBCRT_SHARED)")
    work = Path(tempfile.mkdtemp(prefix="sbcrt-watch-bench-"))
    model = args.model or export_lite0(work)
    if args.http_only:
        report = {"cpu": machine_info()["cpu"], "http": http_report(model, args.rss_model, photos, work, args)}
        out = args.out.with_name(args.out.stem + "_http.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print_http(report["http"])
        print(f"\nwritten {out}")
        return
    classifier = Classifier(model, threads=args.threads, spin=False, cache_dir=False)
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

    # 6. What --http costs: watch with and without it, a client polling every 100 ms.
    report["http"] = http_report(model, args.rss_model, photos, work, args)

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
    print_http(report["http"])


# -- 6. --http: overhead and memory ------------------------------------------------------------------------------

POLL_S = 0.1
SERVING = re.compile(r"http: serving http://127\.0\.0\.1:(\d+)/")


def http_report(model: Path, rss_model: Path | None, photos: list[Path], work: Path, args) -> dict:
    clip = work / "http_1080p.avi"
    frames = photo_frames(photos, SIZE_1080P)
    assert write_video(clip, frames * (args.http_frames // len(frames) + 1), fourcc="MJPG", fps=30)
    out = {"frames": args.http_frames, "poll_s": POLL_S, "models": {}}
    for path in [model] + ([rss_model] if rss_model else []):
        out["models"][path.stem] = http_pairs(path, clip, args.http_frames, args.http_pairs, work)
    return out


def http_pairs(model: Path, clip: Path, frames: int, pairs: int, work: Path) -> dict:
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    for _ in range(pairs):
        for mode in ("without", "with"):
            runs[mode].append(watch_run(model, clip, frames, work, serve=mode == "with"))
    ratios_fps = [w["processed_fps"] / o["processed_fps"] for w, o in zip(runs["with"], runs["without"], strict=True)]
    ratios_p50 = [w["inference_p50_ms"] / o["inference_p50_ms"] for w, o in zip(runs["with"], runs["without"],
                                                                                 strict=True)]  # fmt: skip
    summary = {mode: {key: round(statistics.median(r[key] for r in runs[mode]), 2)
                      for key in ("processed_fps", "inference_p50_ms", "peak_rss_mb")} for mode in runs}  # fmt: skip
    return {
        "runs": runs,
        "median": summary,
        "processed_fps_ratio": round(statistics.median(ratios_fps), 4),
        "inference_p50_ratio": round(statistics.median(ratios_p50), 4),
        "peak_rss_delta_mb": round(summary["with"]["peak_rss_mb"] - summary["without"]["peak_rss_mb"], 1),
        "requests_served": sum(r.get("requests", 0) for r in runs["with"]),
    }


def watch_run(model: Path, clip: Path, frames: int, work: Path, *, serve: bool) -> dict:
    """`python -m sbcrt watch` on the first `frames` frames of the clip; with `serve`, a client polls meanwhile."""
    jsonl = work / f"http_{'with' if serve else 'without'}.jsonl"
    jsonl.unlink(missing_ok=True)
    command = [sys.executable, "-m", "sbcrt", "watch", str(clip), "--model", str(model), "--jsonl", str(jsonl),
               "--stats-interval", "3600"] + (["--http", "127.0.0.1:0"] if serve else [])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    stop = threading.Event()
    served = [0]
    errors: list[str] = []

    def pump() -> None:
        poller = None
        for line in proc.stderr:
            match = SERVING.search(line)
            if match and poller is None:
                poller = threading.Thread(target=poll, args=(int(match[1]),), daemon=True)
                poller.start()
        stop.set()

    def poll(port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        tick = 0
        next_at = time.perf_counter()
        while not stop.is_set():
            paths = ["/api/latest", "/snapshot.jpg", "/metrics"]
            if tick % 10 == 0:
                paths += ["/", "/api/stats", "/api/history?window=600", "/api/events"]
            for path in paths:
                try:
                    connection.request("GET", path)
                    connection.getresponse().read()
                    served[0] += 1
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(f"{path}: {exc}")
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            tick += 1
            next_at += POLL_S
            stop.wait(max(0.0, next_at - time.perf_counter()))
        connection.close()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    # Stop after `frames` records: the clip is longer, so the run never includes the end-of-video teardown.
    peak_kb = 0
    while proc.poll() is None:
        peak_kb = _peak_rss_kb(proc.pid) or peak_kb
        if jsonl.exists() and _lines(jsonl) >= frames:
            proc.send_signal(2)
            break
        time.sleep(0.05)
    if proc.returncode is not None:
        raise RuntimeError(f"watch exited ({proc.returncode}) before {frames} records: {' '.join(command)}")
    proc.wait(60)
    stop.set()
    reader.join(5)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()][10:frames]  # 10 frames of warm-up
    times = [datetime.fromisoformat(r["time"]).timestamp() for r in records]
    result = {
        "processed_fps": round((len(times) - 1) / (times[-1] - times[0]), 2),
        "inference_p50_ms": round(statistics.median(r["timing_ms"]["inference"] for r in records), 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }
    if serve:
        result["requests"] = served[0]
        result["client_errors"] = len(errors)
    return result


def _peak_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def print_http(report: dict) -> None:
    poll_ms = report["poll_s"] * 1000
    print(f"\n--http: {report['frames']} frames of 1080p video, a client polling every {poll_ms:.0f} ms")
    for name, r in report["models"].items():
        o, w = r["median"]["without"], r["median"]["with"]
        print(f"  {name}: processed {o['processed_fps']:.2f} -> {w['processed_fps']:.2f} fps "
              f"(ratio {r['processed_fps_ratio']:.4f}), inference p50 {o['inference_p50_ms']:.2f} -> "
              f"{w['inference_p50_ms']:.2f} ms (ratio {r['inference_p50_ratio']:.4f}), peak RSS "
              f"{o['peak_rss_mb']:.1f} -> {w['peak_rss_mb']:.1f} MB ({r['peak_rss_delta_mb']:+.1f}), "
              f"{r['requests_served']} requests served")  # fmt: skip


if __name__ == "__main__":
    main()
