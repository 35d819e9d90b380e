"""`sbcrt watch` on live sources: an MJPEG-over-HTTP camera served on loopback that freezes, goes away and comes
back; a camera that does not exist; a slow model that must always get the newest frame; memory over a soak."""

from __future__ import annotations

import re
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest

from sbcrt.runtime.classifier import Classifier
from sbcrt.watch.loop import LoopOptions, WatchLoop
from sbcrt.watch.sinks import Sink, StopWatching
from sbcrt.watch.sources import SourceOptions, parse_source
from tests.conftest import build_onnx
from tests.support.watch import (
    RED_PERIOD,
    MjpegServer,
    WatchProcess,
    build_slow_probe,
    decode_number,
    jpeg,
    numbered_frame,
    read_jsonl,
    rss_mb,
)

NUMBERED_JPEGS = [jpeg(numbered_frame(n)) for n in range(RED_PERIOD)]


def numbered_jpeg(n: int) -> bytes:
    return NUMBERED_JPEGS[n % RED_PERIOD]


def record_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_stream_freeze_drop_and_reconnect(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    server = MjpegServer(numbered_jpeg, fps=20).start()
    out = tmp_path / "out.jsonl"
    watcher = WatchProcess(
        server.url, "--model", str(runtime_models["tiny"]), "--timeout", "1", "--stats-interval", "1",
        "--jsonl", str(out),
    )  # fmt: skip
    try:
        watcher.wait_for(lambda: record_count(out) >= 5, 30, "first records")
        # A frozen camera: the connection stays open, nothing arrives. The read timeout (1 s) must notice.
        frozen_at = time.monotonic()
        server.hang()
        watcher.wait_for(lambda: watcher.count(" lost: ") >= 1, 10, "the lost stream")
        assert time.monotonic() - frozen_at < 4.0
        # The camera is off: reconnect attempts are refused and logged with growing delays.
        server.stop()
        watcher.wait_for(lambda: watcher.count("cannot open stream") >= 1, 10, "a failed reopen")
        before = record_count(out)
        last_frame = read_jsonl(out)[-1]["frame"]
        back_at = time.monotonic()
        server.start()  # same port, like a camera that rebooted
        watcher.wait_for(lambda: watcher.count("frames again after") >= 1, 30, "the reconnect")
        watcher.wait_for(lambda: record_count(out) >= before + 5, 30, "records after the reconnect")
        reconnect_s = time.monotonic() - back_at
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
        server.stop()
    records = read_jsonl(out)
    frames = [r["frame"] for r in records]
    assert frames == sorted(set(frames)) and frames[-1] > last_frame  # numbering continues across reopens
    err = "\n".join(watcher.stderr_lines)
    assert re.search(
        r"stats: .* \| camera [\d.]+ fps, processed [\d.]+ fps, skipped [\d.]+ fps \| inference ms p50", err
    )
    summary = [line for line in watcher.stderr_lines if "summary:" in line]
    assert len(summary) == 1 and re.search(r"reconnects [1-9]", summary[0]), summary
    assert "Traceback" not in err
    assert reconnect_s < 15.0


def test_missing_camera_is_retried_with_backoff_until_sigterm(runtime_models: dict[str, Path]) -> None:
    watcher = WatchProcess("/dev/video99", "--model", str(runtime_models["tiny"]))
    try:
        watcher.wait_for(lambda: watcher.count("cannot open camera /dev/video99") >= 3, 20, "three attempts")
        started = time.monotonic()
        assert watcher.signal(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5.0  # a waiting loop stops at once
    finally:
        watcher.kill()
    attempts = [line for line in watcher.stderr_lines if "cannot open camera" in line]
    delays = [float(re.search(r"retrying in ([\d.]+) s", line)[1]) for line in attempts]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert "(not connected, or in use by another program)" in attempts[0]
    assert any("summary: 0 frames" in line for line in watcher.stderr_lines)


def test_slow_model_always_gets_the_newest_frame(tmp_path: Path) -> None:
    server = MjpegServer(numbered_jpeg, fps=50).start()
    model = build_slow_probe(tmp_path / "slow.onnx", matmuls=96)  # ~0.1 s a frame: a gap of ~5 frames at 50 fps
    out = tmp_path / "out.jsonl"
    watcher = WatchProcess(server.url, "--model", str(model), "--threads", "1", "-k", "3", "--jsonl", str(out))
    try:
        watcher.wait_for(lambda: record_count(out) >= 20, 60, "20 records")
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
        server.stop()
    records = read_jsonl(out)[2:]  # the first frames can predate a steady capture
    frames = [r["frame"] for r in records]
    # The pixels processed are those of the numbered frame (the client numbers frames as they arrive, the
    # server encodes its own count in them: a constant offset).
    offsets = {(decode_number(r["topk"]) - r["frame"]) % RED_PERIOD for r in records}
    assert len(offsets) == 1, offsets
    # No backlog: between two processed frames, the frames that arrived meanwhile were skipped.
    gaps = [b - a for a, b in zip(frames, frames[1:], strict=False)]
    processing_s = statistics.median(r["timing_ms"]["total"] - r["timing_ms"]["capture"] for r in records) / 1000
    expected_gap = processing_s * 50
    assert expected_gap >= 3, expected_gap  # the model really is slower than the camera
    assert statistics.median(gaps) >= 0.6 * expected_gap, (gaps, expected_gap)
    # And the frame taken is fresh: its age is a fraction of the time it takes to process it.
    ages = [r["timing_ms"]["capture"] for r in records]
    assert statistics.median(ages) < 0.5 * processing_s * 1000, ages
    summary = next(line for line in watcher.stderr_lines if "summary:" in line)
    assert float(re.search(r"skipped ([\d.]+) fps", summary)[1]) > 10


class StopAfter(Sink):
    """Counts records, notes RSS at `warmup`, stops the loop at `total`."""

    name = "soak"

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.count = 0
        self.rss_after_warmup = 0.0

    def record(self, record, frame) -> None:
        self.count += 1
        if self.count == self.warmup:
            self.rss_after_warmup = rss_mb()
        if self.count >= self.total:
            raise StopWatching("soak done")


def test_memory_stays_flat_over_a_soak(tmp_path: Path) -> None:
    server = MjpegServer(numbered_jpeg, fps=600).start()
    model = build_onnx(tmp_path / "tiny32.onnx", "conv", size=32, config={"labels": ["a", "b", "c", "d"]})
    classifier = Classifier(model, threads=1, spin=False, cache_dir=False)
    source = parse_source(server.url, SourceOptions(timeout_s=2.0))
    counter = StopAfter(warmup=500, total=3500)
    loop = WatchLoop(source, classifier, [counter], options=LoopOptions(stats_interval_s=3600))
    watchdog = threading.Timer(80, loop.stop)  # a stuck soak fails below instead of hanging the suite
    watchdog.start()
    try:
        stats = loop.run()
    finally:
        watchdog.cancel()
        server.stop()
    growth = rss_mb() - counter.rss_after_warmup
    assert counter.count == 3500 and stats.processed == 3500
    assert growth < 20.0, f"RSS grew {growth:.1f} MB over 3000 frames"
    assert source.frames_read >= 3500 and not any(t.name.startswith("sbcrt-capture") for t in threading.enumerate())


@pytest.mark.parametrize("fps", [4.0])
def test_fps_cap_on_a_live_source(fps: float, runtime_models: dict[str, Path]) -> None:
    server = MjpegServer(numbered_jpeg, fps=40).start()
    classifier = Classifier(runtime_models["tiny"], threads=1, spin=False, cache_dir=False)
    source = parse_source(server.url, SourceOptions(timeout_s=2.0, fps=fps))
    times: list[float] = []

    class Clock(Sink):
        def record(self, record, frame) -> None:
            times.append(time.monotonic())
            if len(times) == 9:
                raise StopWatching("enough")

    loop = WatchLoop(source, classifier, [Clock()], options=LoopOptions())
    try:
        loop.run()
    finally:
        server.stop()
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 0.8 * fps < rate <= fps * 1.05, rate
    assert source.frames_skipped > 20  # the camera's other frames were dropped, not queued
