"""Live statistics for `sbcrt watch` in bounded memory: fps counters and latency percentiles.

Latencies go into log-spaced histograms (bins 1 % wide), so percentiles over an interval or over a months-long
run cost the same few kilobytes; a percentile is exact to within half a bin (0.5 %).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

BIN_RATIO = 1.01
_LOG_RATIO = math.log(BIN_RATIO)
SMALLEST_MS = 1e-3  # anything faster shares the first bin


class LatencyHistogram:
    """Counts of latencies (ms) in bins 1 % wide; memory grows with the spread of values, never with their number
    (at most ~2,100 bins between 1 µs and 1,000 s)."""

    def __init__(self) -> None:
        self._bins: dict[int, int] = {}
        self.count = 0
        self.minimum = math.inf
        self.maximum = -math.inf

    def add(self, ms: float) -> None:
        value = max(ms, SMALLEST_MS)
        key = int(math.log(value / SMALLEST_MS) / _LOG_RATIO)
        self._bins[key] = self._bins.get(key, 0) + 1
        self.count += 1
        self.minimum = min(self.minimum, ms)
        self.maximum = max(self.maximum, ms)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100), or None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for key in sorted(self._bins):
            seen += self._bins[key]
            if seen >= rank:
                middle = SMALLEST_MS * BIN_RATIO ** (key + 0.5)
                return min(max(middle, self.minimum), self.maximum)
        return self.maximum

    def percentiles(self, qs: tuple[int, ...]) -> dict[str, float | None]:
        return {f"p{q}": _round(self.percentile(q)) for q in qs}


class WatchStats:
    """Counters and latencies of one `sbcrt watch` run. `snapshot()` gives the numbers since the previous
    snapshot (the periodic stats line); `snapshot(final=True)` the whole run (the summary at exit)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.processed = 0
        self.errors = 0
        self.reconnects = 0
        self._run = {"inference": LatencyHistogram(), "total": LatencyHistogram()}
        self._interval = {"inference": LatencyHistogram(), "total": LatencyHistogram()}
        self._mark = (self.started, 0, 0, 0)  # time, frames read, skipped, processed at the last snapshot

    def add(self, inference_ms: float, total_ms: float) -> None:
        self.processed += 1
        for histograms in (self._run, self._interval):
            histograms["inference"].add(inference_ms)
            histograms["total"].add(total_ms)

    def snapshot(self, frames_read: int, frames_skipped: int, *, final: bool = False) -> dict[str, Any]:
        """Rates in frames/s: camera (delivered by the source), processed, skipped; latency percentiles in ms."""
        now = self._clock()
        if final:
            since, read0, skipped0, processed0 = self.started, 0, 0, 0
            histograms = self._run
        else:
            since, read0, skipped0, processed0 = self._mark
            histograms = self._interval
        seconds = max(now - since, 1e-9)
        out: dict[str, Any] = {
            "final": final,
            "uptime_s": round(now - self.started, 3),
            "interval_s": round(now - since, 3),
            "frames_read": frames_read,
            "frames_processed": self.processed,
            "frames_skipped": frames_skipped,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "camera_fps": round((frames_read - read0) / seconds, 2),
            "processed_fps": round((self.processed - processed0) / seconds, 2),
            "skipped_fps": round((frames_skipped - skipped0) / seconds, 2),
            "inference_ms": histograms["inference"].percentiles((50, 90, 99)),
            "total_ms": histograms["total"].percentiles((50, 90)),
        }
        if not final:
            self._mark = (now, frames_read, frames_skipped, self.processed)
            self._interval = {"inference": LatencyHistogram(), "total": LatencyHistogram()}
        return out


def format_stats(stats: dict[str, Any]) -> str:
    """The stderr line: `stats: camera 25.0 fps, processed 4.9 fps, skipped 20.1 fps | inference ms p50 ...`."""
    inference, total = stats["inference_ms"], stats["total_ms"]
    head = (
        f"summary: {stats['frames_processed']} frames in {stats['uptime_s']:.1f} s"
        if stats["final"]
        else f"stats: {stats['interval_s']:.1f} s"
    )
    return (
        f"{head} | camera {stats['camera_fps']:.1f} fps, processed {stats['processed_fps']:.1f} fps, "
        f"skipped {stats['skipped_fps']:.1f} fps | inference ms p50 {_ms(inference['p50'])} "
        f"p90 {_ms(inference['p90'])} p99 {_ms(inference['p99'])} | total ms p50 {_ms(total['p50'])} "
        f"p90 {_ms(total['p90'])} | errors {stats['errors']}, reconnects {stats['reconnects']}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
