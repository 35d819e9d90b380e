"""The processing loop of `sbcrt watch`: take a frame, classify it, hand the record to the sinks, repeat.

Each frame becomes a Record (its JSON schema and what each timing stage means: types.py), handed to every
sink (sinks.py), then the events its rules fired. Statistics go to the sinks every `stats_interval_s`, also
while a lost source is being reopened (a stats line that stops would look like a hung process).

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
from collections.abc import Callable
from dataclasses import dataclass

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.watch.events import EventRules
from sbcrt.watch.sinks import Sink, StopWatching
from sbcrt.watch.sources import FrameSource, SourceEnded, SourceLost, SourceUnavailable
from sbcrt.watch.stats import WatchStats
from sbcrt.watch.types import Event, Frame, FrameClassifier, Record, Timing

log = logging.getLogger("sbcrt.watch")

POLL_S = 0.25  # longest wait for a frame before checking stop, stats and the watchdog


@dataclass
class LoopOptions:
    top_k: int = 5  # (a --fps cap belongs to the source: FrameSource.max_fps)
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
    decides which frames fire rules; every sink receives the records, events and stats (sinks.Sink); the
    sinks that add to events (the frame saver) get each event first, then the others in the order given.
    """

    def __init__(
        self,
        source: FrameSource,
        classifier: FrameClassifier,
        sinks: list[Sink],
        *,
        events: EventRules | None = None,
        options: LoopOptions | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.sinks = list(sinks)
        self._event_sinks = sorted(self.sinks, key=lambda sink: not sink.enriches_events)  # a stable sort
        self.events = events
        self.options = options or LoopOptions()
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)
        # Enough classes for every rule to see each class that can reach its threshold (see events.py).
        self._rank_k = max(self.options.top_k, events.classes_needed() if events else 1)
        self._lost_at: float | None = None  # set while reconnecting: when the source was lost
        self._last_frame_at = time.monotonic()
        self._next_stats = 0.0  # monotonic time of the next periodic stats

    def stop(self) -> None:
        """Finish the current frame, then end the run (safe from signal handlers and other threads)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> WatchStats:
        """Process frames until the end or stop(); returns the run's statistics. Raises UsageError if a source
        that does not reconnect (a video file) cannot be opened."""
        self._next_stats = time.monotonic() + self.options.stats_interval_s
        next_due = 0.0  # perf_counter time before which no frame is taken (--fps)
        try:
            if not self._open(first=True):
                return self.stats
            while not self._stop.is_set():
                self._stats_if_due()
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
                if self.source.max_fps:
                    next_due = time.perf_counter() + 1.0 / self.source.max_fps
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
                self._call(sink, "close", sink.close)
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
                self._wait(delay)
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
        if self._wait(delay):
            return
        self._open(first=False)

    def _wait(self, seconds: float) -> bool:
        """Sleep while the source is down, still giving the sinks their periodic stats; True if stopped."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            self._stats_if_due()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._stop.wait(min(left, max(0.0, self._next_stats - time.monotonic()) + 0.001))
        return True

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
        record = Record(frame.number, frame.time_text, frame.source, result.topk[: self.options.top_k])
        fired: list[Event] = self.events.update(result.topk, record, frame.media_time) if self.events else []
        record.events = [event.rule for event in fired]
        done = time.perf_counter()
        if frame.path is not None:  # the classifier read the file: its decoding is the capture
            capture_ms, total_ms = None, (done - picked) * 1000
        elif frame.capture_ms is not None:  # a video frame: what reading it cost, then the work on it
            capture_ms = frame.capture_ms
            total_ms = capture_ms + (done - picked) * 1000
        else:  # a live frame: its age when taken, and when its record was ready
            capture_ms, total_ms = (picked - frame.ready_at) * 1000, (done - frame.ready_at) * 1000
        record.timing = Timing.from_stages(
            result.timing_ms, capture_ms=capture_ms, extra_postprocess_ms=(done - classified) * 1000, total_ms=total_ms
        )
        self.stats.add(record.timing.inference, total_ms)
        for sink in self.sinks:
            self._call(sink, "record", sink.record, record, frame)
        for event in fired:
            for sink in self._event_sinks:
                self._call(sink, "event", sink.event, event, frame)

    def _stats_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_stats:
            self._emit_stats(final=False)
            self._next_stats = now + self.options.stats_interval_s

    def _emit_stats(self, *, final: bool) -> None:
        snapshot = self.stats.snapshot(self.source.frames_read, self.source.frames_skipped, final=final)
        for sink in self.sinks:
            self._call(sink, "stats", sink.stats, snapshot)

    def _call(self, sink: Sink, what: str, method: Callable[..., None], *args: object) -> None:
        """One sink call; a failing sink is logged and skipped. StopWatching from record/event ends the run."""
        try:
            method(*args)
        except StopWatching:
            if what in ("stats", "close"):
                return
            raise
        except Exception as exc:  # one broken sink must not stop the others or the loop
            log.error("sink %s: %s failed: %s: %s", sink.name, what, type(exc).__name__, exc)
