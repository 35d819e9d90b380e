"""`sbcrt watch --http [HOST:]PORT`: a page to look at and numbers to scrape, served from the watch process.

Endpoints (GET and HEAD only):

    /                 the page (sbcrt/watch/page/index.html: inline JS/CSS, nothing fetched from elsewhere)
    /api/latest       the latest record, exactly the --jsonl line (404 before the first frame)
    /api/stats        the latest statistics, the MQTT <topic>/stats payload: the stats line as JSON + "top" +
                      "mqtt" (null without --mqtt) (404 before the first statistics, --stats-interval after start)
    /api/events       the last EVENTS_KEPT events, oldest first, each the MQTT <topic>/event payload
    /api/history      ?window=S: the top classes' mean probabilities in buckets over the last S seconds (the chart)
    /api/model        the model's metadata (what `sbcrt info --json` shows), its labels and the --when rules
    /snapshot.jpg     the latest frame as JPEG, at most PAGE_WIDTH pixels wide (?full=1: as captured)
    /snapshots/NAME   a file that --save wrote (names FrameSaver gives only; no other file, no symlink)
    /healthz          200 while frames are processed, 503 once the loop has stalled (never needs the token)
    /metrics          Prometheus text format (prometheus-client, a registry of its own)

Why the server never slows the loop: the sink's methods run on the loop's thread and only swap references (the
record, the frame, the stats dict) under a lock held for a few assignments, observe two histograms and bump a
counter; everything else (JSON, JPEG encoding, file reads, socket writes) happens on the server's threads.
Those threads share the cores (and the GIL) with the loop, so they are kept cheap too: the latest frame is encoded
lazily, when /snapshot.jpg is asked for, at most once per frame and at most once per ENCODE_EVERY_S whatever the
number of clients, scaled to PAGE_WIDTH; the chart's data and /metrics are rendered at most every CACHE_S and
METRICS_CACHE_S. A client that stops reading or never finishes its request holds one thread until the socket
timeout (TIMEOUT_S, for a whole request too), and at most MAX_CONNECTIONS are served at once: more are closed at
once rather than queued. Requests are bounded (MAX_REQUEST_BYTES of request line and headers; no bodies).

Access: `--http-token` (or $SBCRT_HTTP_TOKEN) is checked in constant time, as `Authorization: Bearer TOKEN` or
`?token=TOKEN`; /healthz stays open for supervisors. A bind to anything but loopback needs a token, or
--http-insecure (which logs a warning).
"""

from __future__ import annotations

import errno
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import math
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sbcrt import __version__
from sbcrt.errors import SettingError, UsageError
from sbcrt.watch.sinks import FrameSaver, Sink
from sbcrt.watch.types import Event, Frame, Record

log = logging.getLogger("sbcrt.watch")

INSTALL_HINT = '--http needs prometheus-client: pip install "sbcrt[http]"'
DEFAULT_HOST = "127.0.0.1"
TIMEOUT_S = 10.0  # socket timeout, and the longest a request may take to arrive
MAX_REQUEST_BYTES = 16 * 1024  # request line + headers; browsers send ~1 KB
MAX_CONNECTIONS = 32
# After refusing a request whose rest was not read (too large, a body), keep reading and discarding for a moment
# before closing: closing with unread input sends a TCP reset, which can destroy the error reply in flight.
LINGER_S, LINGER_BYTES = 1.0, 1024 * 1024
EVENTS_KEPT = 50
ENCODE_EVERY_S = 1.0  # /snapshot.jpg encodes a new frame at most this often, however many clients poll
JPEG_QUALITY = 85
# /snapshot.jpg scales wider frames down; ?full=1 does not. Half of 1080p: the resize takes INTER_AREA's 2x path, and
# watch's peak RSS on 1080p video with a client polling the snapshot was +8.0 MB at 960 vs +14.3 MB at 1280 (B).
PAGE_WIDTH = 960
CACHE_S = 1.0  # /api/history is rebuilt at most this often per window: its buckets are 1 s wide anyway
METRICS_CACHE_S = 0.5  # /metrics rendered at most twice a second, however often it is scraped
STALL_S = 60.0  # /healthz: like the image's HEALTHCHECK (tools/arm64/healthcheck.sh), 60 s without a frame
# Chart history: (bucket seconds, buckets kept): 1 s for the last hour, 1 min for the last day.
HISTORY_TIERS = ((1.0, 3600), (60.0, 1440))
SERIES_PER_BUCKET = 5  # classes kept per finished bucket: the chart draws the top few
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
                 ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}  # fmt: skip
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a ?token= in the page's URL never leaks through links
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
# The page may only talk to this server: a compromised label or file name cannot make it load anything else.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class HttpSettings:
    host: str = DEFAULT_HOST
    port: int = 8080
    token: str | None = field(default=None, repr=False)  # never in logs or reprs
    insecure: bool = False
    save_dir: Path | None = None  # --save DIR: the only folder /snapshots/ serves from
    live: bool = True  # a camera or stream: no frame for stall_s is a stall; folders may be idle for days
    stall_s: float = STALL_S
    stats_interval_s: float = 5.0  # the loop's cadence: an idle folder source still calls stats() this often
    timeout_s: float = TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPv6]:PORT` -> (host, port); the host defaults to 127.0.0.1 (loopback only)."""
    text = text.strip()
    host, port_text = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise SettingError("http.address", "expected [IPv6]:PORT, e.g. [::1]:8080", text)
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        host, port_text = text.rsplit(":", 1)
        if not host or ":" in host:
            raise SettingError(
                "http.address", "expected [HOST:]PORT, e.g. 8080 or 0.0.0.0:8080 ([::]:8080 for IPv6)", text
            )
    if not port_text.isdigit() or int(port_text) > 65535:
        raise SettingError("http.address", "the port must be a number from 0 to 65535", text)
    return host, int(port_text)


def check_exposure(settings: HttpSettings) -> str | None:
    """Refuses an open port without a token; returns the warning to log when `insecure` allows one."""
    if settings.token is not None and not settings.token.strip():
        raise SettingError("http.token", "the token is empty")
    if settings.loopback or settings.token:
        return None
    if not settings.insecure:
        raise SettingError(
            "http.address",
            "listens beyond this machine: set {http.token} (or $SBCRT_HTTP_TOKEN), or say {http.insecure} to "
            "serve it to anyone who can reach the port",
            f"{settings.host}:{settings.port}",
            cites=["http.token", "http.insecure"],
        )
    return (
        f"http: serving {settings.host}:{settings.port} WITHOUT a token (insecure on request): anyone who can reach "
        "this port sees the camera's frames and saved snapshots"
    )


def open_listener(settings: HttpSettings) -> socket.socket:
    """The server's socket, bound and listening; a port in use (or a host not on this machine) is a SettingError."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart while old connections linger
        listener.bind((settings.host, settings.port))
        listener.listen(_Server.request_queue_size)
    except OSError as exc:
        listener.close()
        raise SettingError(
            "http.address", f"cannot listen: {exc.strerror or exc}", f"{settings.host}:{settings.port}"
        ) from None
    return listener


def load_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return prometheus_client


def check_settings(settings: HttpSettings) -> HttpSettings:
    """Checked before the model loads: the exposure rules, and that prometheus-client is importable."""
    check_exposure(settings)
    load_prometheus()
    return settings


# -- what the loop hands over ------------------------------------------------------------------------------------


class ProbabilityHistory:
    """The chart's data in bounded memory: for each tier, buckets of `step` seconds (wall clock) holding each
    class's mean probability over the bucket's frames (a class outside a frame's top-k counts as 0 for that
    frame). A finished bucket keeps only its SERIES_PER_BUCKET best classes. Per frame: a few dict updates."""

    def __init__(self, tiers: Iterable[tuple[float, int]] = HISTORY_TIERS) -> None:
        self._tiers = [(step, deque(maxlen=size)) for step, size in tiers]
        self._open: list[list[Any] | None] = [None] * len(self._tiers)  # [start, frames, {index: sum}]

    def add(self, when: float, topk: list[dict[str, Any]]) -> None:
        for i, (step, buckets) in enumerate(self._tiers):
            start = math.floor(when / step) * step
            bucket = self._open[i]
            if bucket is None or bucket[0] != start:
                if bucket is not None:
                    buckets.append(self._finish(bucket))
                bucket = self._open[i] = [start, 0, {}]
            bucket[1] += 1
            sums = bucket[2]
            for p in topk:
                sums[p["index"]] = sums.get(p["index"], 0.0) + p["prob"]

    @staticmethod
    def _finish(bucket: list[Any]) -> tuple[float, tuple[tuple[int, float], ...]]:
        start, frames, sums = bucket
        best = sorted(sums.items(), key=lambda item: -item[1])[:SERIES_PER_BUCKET]
        return start, tuple((index, round(total / frames, 4)) for index, total in best)

    def points(self, seconds: float) -> tuple[float, list[tuple[float, tuple[tuple[int, float], ...]]]]:
        """(bucket seconds, the buckets) of the finest tier that covers `seconds`: a copy, cheap enough to take
        under the state's lock; summarise() works on it outside the lock."""
        tier = next((i for i, (step, b) in enumerate(self._tiers) if step * b.maxlen >= seconds), len(self._tiers) - 1)
        step, buckets = self._tiers[tier]
        points = list(buckets)
        if self._open[tier] is not None:
            points.append(self._finish(self._open[tier]))
        return step, points

    @staticmethod
    def summarise(step: float, points: list[Any], seconds: float, now: float, series: int = 5) -> dict[str, Any]:
        """The chart's data: the buckets of the last `seconds`, and the `series` classes with the highest mean."""
        points = [p for p in points if p[0] + step > now - seconds]
        totals: dict[int, float] = {}
        for _, probs in points:
            for index, prob in probs:
                totals[index] = totals.get(index, 0.0) + prob
        chosen = sorted(totals, key=lambda index: -totals[index])[:series]
        by_index = [dict(probs) for _, probs in points]
        return {
            "window_s": seconds,
            "step_s": step,
            "now": round(now, 3),
            "times": [round(start, 3) for start, _ in points],
            "series": [{"index": index, "values": [probs.get(index, 0.0) for probs in by_index]} for index in chosen],
        }  # fmt: skip


class WatchState:
    """The latest record, frame, statistics and events, shared between the loop's thread (writes: reference
    swaps under the lock) and the server's threads (reads: copies of references, then work outside the lock)."""

    def __init__(self, settings: HttpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.lock = threading.Lock()
        self.started = clock()
        self.record: dict[str, Any] | None = None
        self.frame: Frame | None = None
        self.stats: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.history = ProbabilityHistory()
        self.labels: dict[int, str] = {}
        self.top: dict[str, Any] | None = None
        self.frames = 0
        self.last_frame_at: float | None = None
        self.last_tick = self.started  # the loop's last call of any kind: it is alive

    def on_record(self, record: dict[str, Any], frame: Frame) -> None:
        now = self._clock()
        topk = record["topk"]
        top = topk[0] if topk else None
        with self.lock:
            self.record, self.frame = record, frame
            self.frames += 1
            self.last_frame_at = self.last_tick = now
            if top is not None:
                self.top = {"label": top["label"], "prob": top["prob"], "frame": record["frame"],
                            "time": record["time"]}  # fmt: skip
            for p in topk:
                self.labels.setdefault(p["index"], p["label"])
            self.history.add(frame.wall_time, topk)

    def on_event(self, payload: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(payload)

    def on_stats(self, stats: dict[str, Any]) -> None:
        with self.lock:
            self.stats = stats
            self.last_tick = self._clock()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while frames arrive within stall_s; a folder or video (not live) may be idle, but its loop
        must still tick (stats() every --stats-interval)."""
        now = self._clock()
        with self.lock:
            last_frame, last_tick, frames = self.last_frame_at, self.last_tick, self.frames
        since_frame = now - (last_frame if last_frame is not None else self.started)
        if self.settings.live:
            ok = since_frame < self.settings.stall_s
        else:
            ok = now - last_tick < max(self.settings.stall_s, 2 * self.settings.stats_interval_s + 1.0)
        return ok, {
            "status": "ok" if ok else "stalled",
            "frames_processed": frames,
            "last_frame_age_s": round(now - last_frame, 3) if last_frame is not None else None,
            "uptime_s": round(now - self.started, 3),
        }


# -- Prometheus ---------------------------------------------------------------------------------------------------


class Metrics:
    """The /metrics registry: its own CollectorRegistry (never the process-wide default one), with counters and
    histograms updated per frame and a collector that reads the latest statistics at scrape time."""

    def __init__(
        self,
        state: WatchState,
        *,
        model: dict[str, Any],
        rules: list[str],
        mqtt_counters: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        prom = load_prometheus()
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._prom = prom
        registry = self.registry = prom.CollectorRegistry(auto_describe=True)
        self.processed = prom.Counter("sbcrt_frames_processed", "Frames classified", registry=registry)
        self.events = prom.Counter("sbcrt_events", "Events fired, by --when rule", ["rule"], registry=registry)
        for rule in rules:
            self.events.labels(rule=rule)  # every rule has a series from the start, at 0
        self.inference = prom.Histogram("sbcrt_inference_seconds", "Model inference time per frame",
                                        buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        self.total = prom.Histogram("sbcrt_frame_latency_seconds", "Per frame: capture to record (timing_ms.total)",
                                    buckets=LATENCY_BUCKETS_S, registry=registry)  # fmt: skip
        info = {
            "architecture": str(model.get("architecture", "")),
            "precision": str(model.get("precision", "")),
            "classes": str(model.get("num_classes", "")),
            "input": "x".join(str(d) for d in (model.get("input") or {}).get("shape", [])),
            "checkpoint_sha256": str(model.get("checkpoint_sha256", "")),
            "exporter": str(model.get("exporter", "")),
            "untrained": str(bool(model.get("untrained", False))).lower(),
            "model": Path(str(model.get("path", ""))).name,
            "sbcrt_version": __version__,
        }
        prom.Info("sbcrt_model", "The model being run (labels only; the value is 1)", registry=registry).info(info)

        class Latest:
            """Counters and gauges read from the loop's latest statistics when Prometheus scrapes."""

            def collect(self) -> Iterable[Any]:
                with state.lock:
                    stats = state.stats or {}
                ok, health = state.health()
                for name, key, text in (
                    ("sbcrt_frames_read", "frames_read", "Frames delivered by the source"),
                    ("sbcrt_frames_skipped", "frames_skipped", "Frames not classified (newest-frame-only, --stride)"),
                    ("sbcrt_errors", "errors", "Frames that failed (unreadable images, inference errors)"),
                    ("sbcrt_reconnects", "reconnects", "Times the source was lost and reopened"),
                ):
                    yield CounterMetricFamily(name, text + " (as of the last statistics)", value=stats.get(key, 0))
                for name, key, text in (
                    ("sbcrt_camera_fps", "camera_fps", "Frames per second delivered by the source"),
                    ("sbcrt_processed_fps", "processed_fps", "Frames per second classified"),
                    ("sbcrt_skipped_fps", "skipped_fps", "Frames per second skipped"),
                ):
                    yield GaugeMetricFamily(name, text + " over the last --stats-interval", value=stats.get(key, 0))
                yield GaugeMetricFamily("sbcrt_healthy", "1 while frames are processed (as /healthz)", value=int(ok))
                age = health["last_frame_age_s"]
                yield GaugeMetricFamily("sbcrt_last_frame_age_seconds", "Seconds since the last classified frame",
                                        value=age if age is not None else math.nan)  # fmt: skip
                yield GaugeMetricFamily("sbcrt_uptime_seconds", "Seconds since watch started", value=health["uptime_s"])
                if mqtt_counters is not None:
                    mqtt = mqtt_counters()
                    yield GaugeMetricFamily("sbcrt_mqtt_connected", "1 while connected to the broker",
                                            value=int(mqtt["connected"]))  # fmt: skip
                    yield GaugeMetricFamily("sbcrt_mqtt_queued", "Messages waiting to be sent", value=mqtt["queued"])
                    yield CounterMetricFamily("sbcrt_mqtt_sent", "Messages published", value=mqtt["sent"])
                    yield CounterMetricFamily("sbcrt_mqtt_dropped", "Messages dropped by the full queue",
                                              value=mqtt["dropped"])  # fmt: skip
                    yield CounterMetricFamily("sbcrt_mqtt_reconnects", "Reconnections to the broker",
                                              value=mqtt["reconnects"])  # fmt: skip

        registry.register(Latest())

    def on_record(self, record: dict[str, Any]) -> None:
        timing = record["timing_ms"]
        self.processed.inc()
        self.inference.observe(timing["inference"] / 1000)
        self.total.observe(timing["total"] / 1000)

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


# -- the sink -----------------------------------------------------------------------------------------------------


class HttpSink(Sink):
    """Serves the page, the API and /metrics on its own threads; the loop only hands over references."""

    name = "http"

    def __init__(
        self,
        settings: HttpSettings,
        *,
        model: dict[str, Any] | None = None,
        labels: list[str] | None = None,
        rules: list[str] | None = None,
        source: str = "",
        mqtt_counters: Callable[[], dict[str, Any]] | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        """`listener`: a socket from open_listener, taken before the slow start-up (the model) so a port in use
        fails first; by default the sink opens its own."""
        self.settings = settings
        warning = check_exposure(settings)
        self.state = WatchState(settings)
        self.model = {**(model or {}), "labels": list(labels or []), "rules": list(rules or []), "source": source,
                      "sbcrt_version": __version__}  # fmt: skip
        self.metrics = Metrics(self.state, model=self.model, rules=list(rules or []), mqtt_counters=mqtt_counters)
        self._mqtt_counters = mqtt_counters
        self._jpeg: dict[bool, tuple[Any, bytes, float]] = {}  # full size? -> (frame key, JPEG, when encoded)
        self._cache: dict[Any, tuple[float, Any]] = {}  # rendered responses: key -> (when, value)
        self._cache_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self.page = resources.files("sbcrt.watch").joinpath("page/index.html").read_bytes()
        self._save_dir = settings.save_dir.resolve() if settings.save_dir else None
        self.server = _Server(self, listener if listener is not None else open_listener(settings))
        self.settings.port = self.server.server_address[1]  # port 0: the one the system chose
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="sbcrt-http", daemon=True)  # fmt: skip
        self._thread.start()
        if warning:
            log.warning("%s", warning)
        log.info("http: serving %s%s", self.settings.url, " (token required)" if settings.token else "")

    # -- the loop's side: reference swaps only --------------------------------------------------------------------

    def record(self, record: Record, frame: Frame) -> None:
        data = record.to_json()
        self.state.on_record(data, frame)
        self.metrics.on_record(data)

    def event(self, event: Event, frame: Frame) -> None:
        snapshot = event.snapshot  # set by the saver, which sees every event first
        payload = {**event.to_dict(), "event_type": event.rule, "snapshot": str(snapshot) if snapshot else None,
                   "topk": event.record.to_json()["topk"] if event.record else []}  # fmt: skip
        self.state.on_event(payload)
        self.metrics.events.labels(rule=event.rule).inc()

    def stats(self, stats: dict[str, Any]) -> None:
        self.state.on_stats(stats)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(2.0)

    # -- the server's side --------------------------------------------------------------------------------------

    def stats_payload(self) -> dict[str, Any] | None:
        with self.state.lock:
            stats, top = self.state.stats, self.state.top
        if stats is None:
            return None
        return {**stats, "top": top, "mqtt": self._mqtt_counters() if self._mqtt_counters else None}

    def history_payload(self, window_s: float) -> dict[str, Any]:
        with self.state.lock:  # a copy of the references under the lock; the loop waits for nothing more
            step, points = self.state.history.points(window_s)
            labels = dict(self.state.labels)
        data = ProbabilityHistory.summarise(step, points, window_s, time.time())
        for series in data["series"]:
            series["label"] = labels.get(series["index"], str(series["index"]))
        return data

    def cached(self, key: Any, max_age_s: float, build: Callable[[], Any]) -> Any:
        """`build()`'s value, rebuilt at most every `max_age_s` (one builder at a time; the others reuse it)."""
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < max_age_s:
                return hit[1]
            value = build()
            self._cache[key] = (time.monotonic(), value)
            return value

    def latest_jpeg(self, *, full: bool = False) -> tuple[bytes, int] | None:
        """The latest frame as JPEG (frame number too), encoded here on a server thread, at most once per frame
        and once per ENCODE_EVERY_S: clients polling faster get the previous encoding."""
        with self.state.lock:
            frame = self.state.frame
        if frame is None:
            return None
        key = (frame.source, frame.number)
        cached = self._jpeg.get(full)
        if cached is not None and (cached[0] == key or time.monotonic() - cached[2] < ENCODE_EVERY_S):
            return cached[1], cached[0][1]
        with self._encode_lock:  # one encoding at a time; the others then reuse it
            cached = self._jpeg.get(full)
            if cached is not None and (cached[0] == key or time.monotonic() - cached[2] < ENCODE_EVERY_S):
                return cached[1], cached[0][1]
            data = _encode(frame, None if full else PAGE_WIDTH)
            if data is None:
                return None
            self._jpeg[full] = (key, data, time.monotonic())
            return data, frame.number

    def open_snapshot(self, name: str) -> tuple[int, int, str] | None:
        """(file descriptor, size, content type) of a file --save wrote, or None. Only names FrameSaver gives
        (no separators, no dot files), opened inside the folder without following a symlink, regular files only."""
        if self._save_dir is None or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            return None
        if not FrameSaver.SAVED_NAME.match(name) or ".." in name:
            return None
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1].lower())
        if content_type is None:
            return None
        try:
            folder = os.open(self._save_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        except OSError:  # missing, a symlink (ELOOP), not readable
            return None
        finally:
            os.close(folder)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return fd, info.st_size, content_type


def _encode(frame: Frame, max_width: int | None) -> bytes | None:
    import cv2

    if frame.path is not None:  # a folder's photo: the file itself when it is a JPEG (EXIF and all)
        try:
            if frame.path.suffix.lower() in (".jpg", ".jpeg"):
                return frame.path.read_bytes()
            image = cv2.imread(str(frame.path), cv2.IMREAD_COLOR)
        except OSError:  # removed since: the page shows the previous image
            return None
        if image is None:
            return None
    else:
        image = frame.image
    if max_width is not None and image.shape[1] > max_width:
        height = round(image.shape[0] * max_width / image.shape[1])
        image = cv2.resize(image, (max_width, height), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return encoded.tobytes() if ok else None


# -- HTTP ---------------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


class _RequestTooLarge(Exception):
    pass


class _BoundedReader:
    """The request's input, cut off past MAX_REQUEST_BYTES or the request's deadline: a client cannot make a
    thread hold megabytes of headers or trickle one byte per timeout forever."""

    def __init__(self, raw: Any, limit: int, timeout_s: float) -> None:
        self._raw, self._limit, self._timeout_s = raw, limit, timeout_s
        self.reset()

    def reset(self) -> None:
        self._left = self._limit
        self._deadline = time.monotonic() + self._timeout_s

    def readline(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise TimeoutError("request took too long")
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        line = self._raw.readline(want)
        if len(line) > self._left:
            raise _RequestTooLarge()
        self._left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        raise _RequestTooLarge()  # nothing here reads a body

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, sink: HttpSink, listener: socket.socket) -> None:
        self.sink = sink
        settings = sink.settings
        self.address_family = listener.family
        self._slots = threading.BoundedSemaphore(settings.max_connections)
        self.handler_timeout = settings.timeout_s
        super().__init__(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the one TCPServer made; serve on the listener, bound and listening already
        self.socket = listener
        self.server_address = listener.getsockname()
        # Not HTTPServer.server_bind: it would look up the host's FQDN, seconds on an offline board without DNS.
        self.server_name, self.server_port = settings.host, self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: refuse at once, never queue behind slow clients
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished mid-response is routine; no traceback on stderr for it.
        log.debug("http: %s: connection ended with an error", client_address[0], exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page's polling reuses its connections
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall between
    server_version = f"sbcrt/{__version__}"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version

    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.handler_timeout  # StreamRequestHandler sets it on the socket
        super().setup()
        self.rfile = _BoundedReader(self.rfile, MAX_REQUEST_BYTES, self.timeout)

    def handle_one_request(self) -> None:
        self.rfile.reset()
        self._head = False
        self._unread_input = False
        try:
            super().handle_one_request()
        except _RequestTooLarge:
            self.close_connection = self._unread_input = True
            if not hasattr(self, "request_version"):  # cut off in the request line: what http.server does for 414
                self.requestline, self.request_version, self.command = "", "", ""
            self._error(431, "request too large")
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        if self._unread_input:
            self._linger()

    def _linger(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_S)
            deadline, drained = time.monotonic() + LINGER_S, 0
            while drained < LINGER_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(64 * 1024)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("http: %s %s", self.address_string(), format % args)

    # -- routing ------------------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    def _not_allowed(self) -> None:
        self.close_connection = self._unread_input = True  # a body may follow; it is not read
        self._error(405, "only GET and HEAD", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _route(self, *, head: bool) -> None:
        self._head = head
        if self.request_version == "HTTP/0.9":  # "GET /" alone: no headers to carry a token, nothing uses it
            return self.send_error(400, "HTTP/1.0 or 1.1 only")
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
            # A body we will not read would be parsed as the next request.
            self.close_connection = self._unread_input = True
            return self._error(413, "GET requests have no body")
        try:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, max_num_fields=8)
        except ValueError:
            return self._error(400, "malformed query")
        path = parts.path
        if path == "/healthz":
            ok, body = self.server.sink.state.health()
            return self._json(body, 200 if ok else 503)
        if not self._authorised(query):
            return self._error(401, "a token is needed: Authorization: Bearer TOKEN, or ?token=TOKEN",
                               {"WWW-Authenticate": 'Bearer realm="sbcrt"'})  # fmt: skip
        sink = self.server.sink
        if path in ("/", "/index.html"):
            return self._send(200, sink.page, "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})
        if path == "/api/latest":
            with sink.state.lock:
                record = sink.state.record
            return self._json(record) if record is not None else self._error(404, "no frame classified yet")
        if path == "/api/stats":
            stats = sink.stats_payload()
            return self._json(stats) if stats is not None else self._error(404, "no statistics yet")
        if path == "/api/events":
            with sink.state.lock:
                events = list(sink.state.events)
            return self._json(events)
        if path == "/api/history":
            try:
                window = float(query.get("window", ["600"])[0])
            except ValueError:
                window = math.nan
            if not 1 <= window <= 86400:
                return self._error(400, "window: seconds from 1 to 86400")
            body = sink.cached(("history", window), CACHE_S, lambda: _dumps(sink.history_payload(window)))
            return self._send(200, body, "application/json")
        if path == "/api/model":
            return self._json(sink.model)
        if path == "/metrics":
            body, content_type = sink.cached("metrics", METRICS_CACHE_S, sink.metrics.render)
            return self._send(200, body, content_type)
        if path == "/snapshot.jpg":
            latest = sink.latest_jpeg(full=query.get("full", ["0"])[0] == "1")
            if latest is None:
                return self._error(404, "no frame yet")
            return self._send(200, latest[0], "image/jpeg", {"X-Frame": str(latest[1])})
        if path.startswith("/snapshots/"):
            return self._snapshot(unquote(path[len("/snapshots/") :]))
        return self._error(404, "not found")

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        token = self.server.sink.settings.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        elif "token" in query:
            given = query["token"][0]
        else:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))

    def _snapshot(self, name: str) -> None:
        opened = self.server.sink.open_snapshot(name)
        if opened is None:
            return self._error(404, "no such snapshot")
        fd, size, content_type = opened
        with os.fdopen(fd, "rb") as file:
            self._start(200, content_type, size, {"Cache-Control": "private, max-age=86400"})
            if self._head:
                return
            while chunk := file.read(64 * 1024):
                self.wfile.write(chunk)

    # -- responses ----------------------------------------------------------------------------------------------

    def _start(self, status: int, content_type: str, length: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        merged = {**SECURITY_HEADERS, **(headers or {})}
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for key, value in merged.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self._start(status, content_type, len(body), headers)
        if not self._head:
            self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, _dumps(value), "application/json")

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (400 malformed, 414, 431, 501): one JSON line, and close the connection.
        self.close_connection = self._unread_input = True
        if getattr(self, "request_version", "") == "HTTP/0.9":  # unparsable: still answer with a status line
            self.request_version = "HTTP/1.1"
        try:
            self._error(code, message or http.client.responses.get(code, "error"))
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
