"""The processing loop of `sbcrt watch`: take a frame, classify it, hand the record to the sinks, repeat.

The per-frame record (one JSON line in --jsonl):

    {"frame": 1234, "time": "2025-05-01T06:12:03.481+02:00", "source": "rtsp://cam-pen3/stream1",
     "topk": [{"index": 3, "label": "fox", "prob": 0.82}, ...],
     "timing_ms": {"capture": .., "preprocess": .., "inference": .., "postprocess": .., "total": ..}}
    (+ "events": ["fox,coyote>=0.6"] on a frame where rules fired)

timing_ms, by source:
- live (camera, stream, picamera2): capture = the frame's age when the loop took it (time since the capture
  thread received it); total = the frame's age when its record was ready: the end-to-end latency.
- video file: capture = reading and decoding the frame (and grabbing the frames subsampling skipped).
- folder/glob image: capture = reading and decoding the file (EXIF orientation applied, as `sbcrt classify`).
preprocess/inference/postprocess are the classifier's stages (postprocess adds building the record and
evaluating the rules); total is wall time, so the stages add up to it within microseconds.

What keeps it unattended: a source that fails to open or stops delivering is closed and reopened with
exponential backoff (0.5 s doubling to 30 s), forever; a live source silent for `stall_timeout_s` is treated as
lost even if its driver never returns an error; a frame that fails (a corrupt photo) is logged and skipped;
a sink that fails is logged and skipped. `stop()` (wired to SIGINT/SIGTERM) lets the current frame finish, then
the sinks get the final stats and are closed. Nothing accumulates per frame: memory stays flat.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.watch.events import Event, EventRules
from sbcrt.watch.sinks import Sink, StopWatching
from sbcrt.watch.sources import Frame, FrameSource, SourceEnded, SourceLost, SourceUnavailable
from sbcrt.watch.stats import WatchStats

log = logging.getLogger("sbcrt.watch")

POLL_S = 0.25  # longest wait for a frame before checking stop, stats and the watchdog


@dataclass
class LoopOptions:
    top_k: int = 5
    fps: float | None = None  # cap on processed frames per wall-clock second (live sources and folders)
    stats_interval_s: float = 10.0
    stall_timeout_s: float = 10.0  # a live source with no frame for this long is reopened
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


class Backoff:
    """Delays between reconnect attempts: initial, doubling up to a ceiling; reset once frames flow again."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self.initial_s, self.maximum_s = initial_s, maximum_s
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.maximum_s, self.initial_s * 2**self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0


class WatchLoop:
    """Runs `classifier` on the frames of `source` until the source ends (video file) or `stop()` is called.

    `classifier` is an sbcrt Classifier (or anything with its `classify`/`classify_frame`); `events` (optional)
    decides which frames fire rules; every sink receives the records, events and stats.
    """

    def __init__(
        self,
        source: FrameSource,
        classifier: Any,
        sinks: list[Sink],
        *,
        events: EventRules | None = None,
        options: LoopOptions | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.sinks = list(sinks)
        self.events = events
        self.options = options or LoopOptions()
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)
        # Enough classes for every rule to see each class that can reach its threshold (see events.py).
        self._rank_k = max(self.options.top_k, events.classes_needed() if events else 1)
        self._lost_at: float | None = None  # set while reconnecting: when the source was lost
        self._last_frame_at = time.monotonic()

    def stop(self) -> None:
        """Finish the current frame, then end the run (safe from signal handlers and other threads)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> WatchStats:
        """Process frames until the end or stop(); returns the run's statistics. Raises UsageError if a source
        that does not reconnect (a video file) cannot be opened."""
        next_stats = time.monotonic() + self.options.stats_interval_s
        next_due = 0.0  # perf_counter time before which no frame is taken (--fps)
        try:
            if not self._open(first=True):
                return self.stats
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_stats:
                    self._emit_stats(final=False)
                    next_stats = now + self.options.stats_interval_s
                wait = next_due - time.perf_counter()
                if wait > 0:
                    self._stop.wait(min(wait, POLL_S))
                    continue
                try:
                    frame = self.source.next_frame(POLL_S)
                except SourceEnded:
                    log.info("%s: end of the video", self.source.name)
                    break
                except SourceLost as exc:
                    self._reconnect(str(exc))
                    continue
                if frame is None:
                    if self.source.live and time.monotonic() - self._last_frame_at > self.options.stall_timeout_s:
                        self._reconnect(f"no frame for {self.options.stall_timeout_s:.0f} s")
                    continue
                if self.options.fps and self.source.kind != "video":  # a video is subsampled by its source
                    next_due = time.perf_counter() + 1.0 / self.options.fps
                self._frame_arrived()
                try:
                    self._process(frame)
                except StopWatching as exc:
                    log.info("stopping: %s", exc)
                    break
        finally:
            self.source.close()
            self._emit_stats(final=True)
            for sink in self.sinks:
                self._call(sink, "close")
        return self.stats

    # -- source lifecycle ---------------------------------------------------------------------------------------

    def _open(self, *, first: bool) -> bool:
        """Open the source, retrying with backoff while it reconnects; False if stopped meanwhile."""
        while not self._stop.is_set():
            try:
                self.source.open()
            except SourceUnavailable as exc:
                if not self.source.reconnects:
                    raise UsageError(f"{self.source.name}: {exc}") from None
                delay = self._backoff.next_delay()
                log.warning(
                    "cannot open %s: %s; retrying in %.1f s (attempt %d)",
                    self.source.describe(),
                    exc,
                    delay,
                    self._backoff.attempts,
                )
                if self._lost_at is None and first:
                    self._lost_at = time.monotonic()
                self._stop.wait(delay)
                continue
            if first:
                log.info("watching %s", self.source.describe())
            self._last_frame_at = time.monotonic()
            return True
        return False

    def _reconnect(self, reason: str) -> None:
        self.source.close()
        self.stats.reconnects += 1
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        delay = self._backoff.next_delay()
        log.warning("%s lost: %s; reconnecting in %.1f s", self.source.describe(), reason, delay)
        if self._stop.wait(delay):
            return
        self._open(first=False)

    def _frame_arrived(self) -> None:
        self._last_frame_at = time.monotonic()
        if self._lost_at is not None:
            log.info(
                "%s: frames again after %.1f s (%d attempts)",
                self.source.describe(),
                self._last_frame_at - self._lost_at,
                self._backoff.attempts,
            )
            self._lost_at = None
        self._backoff.reset()

    # -- one frame ------------------------------------------------------------------------------------------------

    def _process(self, frame: Frame) -> None:
        picked = time.perf_counter()
        try:
            if frame.path is not None:
                result = self.classifier.classify(frame.path, top_k=self._rank_k, source=frame.source)
            else:
                result = self.classifier.classify_frame(frame.image, bgr=True, top_k=self._rank_k)
        except SbcrtError as exc:  # an unreadable or corrupt image: skip it, keep watching
            self.stats.errors += 1
            log.warning("%s: skipped: %s", frame.source, exc)
            return
        except Exception as exc:  # onnxruntime or memory failure on one frame must not end an unattended run
            self.stats.errors += 1
            log.error("%s: frame %d failed: %s: %s", frame.source, frame.number, type(exc).__name__, exc)
            return
        classified = time.perf_counter()
        stages = result.timing_ms
        if frame.path is not None:
            capture_ms, preprocess_ms = stages["decode"], stages["preprocess"]
        else:
            # An array needs no decoding; the classifier's "decode" is only its pass-through.
            capture_ms = frame.capture_ms if frame.capture_ms is not None else (picked - frame.ready_at) * 1000
            preprocess_ms = stages["decode"] + stages["preprocess"]
        ranked = [{"index": p.index, "label": p.label, "prob": p.prob} for p in result.topk]
        record: dict[str, Any] = {
            "frame": frame.number,
            "time": datetime.fromtimestamp(frame.wall_time).astimezone().isoformat(timespec="milliseconds"),
            "source": frame.source,
            "topk": ranked[: self.options.top_k],
        }
        fired: list[Event] = self.events.update(ranked, record, frame.media_time) if self.events else []
        if fired:
            record["events"] = [event.rule for event in fired]
        done = time.perf_counter()
        if frame.path is not None:
            total_ms = (done - picked) * 1000
        elif frame.capture_ms is not None:
            total_ms = capture_ms + (done - picked) * 1000
        else:
            total_ms = (done - frame.ready_at) * 1000
        timing = {
            "capture": capture_ms,
            "preprocess": preprocess_ms,
            "inference": stages["inference"],
            "postprocess": stages["postprocess"] + (done - classified) * 1000,
            "total": total_ms,
        }
        record["timing_ms"] = {stage: round(ms, 3) for stage, ms in timing.items()}
        self.stats.add(stages["inference"], total_ms)
        for sink in self.sinks:
            self._call(sink, "record", record, frame)
        for event in fired:
            for sink in self.sinks:
                self._call(sink, "event", event, frame)

    def _emit_stats(self, *, final: bool) -> None:
        snapshot = self.stats.snapshot(self.source.frames_read, self.source.frames_skipped, final=final)
        for sink in self.sinks:
            self._call(sink, "stats", snapshot)

    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except StopWatching:
            if method in ("stats", "close"):
                return
            raise
        except Exception as exc:  # one broken sink must not stop the others or the loop
            log.error("sink %s: %s failed: %s: %s", sink.name, method, type(exc).__name__, exc)
