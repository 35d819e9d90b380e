"""Where `sbcrt watch` results go. Every sink gets the same three calls from the loop:

    record(record, frame)   once per processed frame: the JSON record (see loop.py) and the frame it describes
    event(event, frame)     once per fired rule (events.py), after the frame's record
    stats(stats)            every --stats-interval seconds, and once with stats["final"] = True at exit
    close()                 at exit, after the final stats

Sinks run on the loop's thread, so a sink must not block: one that talks to the network (MQTT) hands the
data to its own thread through a bounded queue. A sink that raises is logged and skipped for that call; the
loop goes on. A sink raises StopWatching to end the run (e.g. stdout closed by `| head`).

Sinks that write files survive a full disk and unwritable folders: they log the problem once, drop what they
cannot write, retry later and log again when writing works.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from sbcrt.errors import UsageError
from sbcrt.watch.events import Event
from sbcrt.watch.sources import Frame
from sbcrt.watch.stats import format_stats

log = logging.getLogger("sbcrt.watch")

RETRY_S = 10.0  # how often a failing file sink tries again
REMIND_S = 300.0  # how often a sink that keeps failing says so again
SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
SIZE_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4})


class StopWatching(Exception):
    """Raised by a sink to end the run cleanly."""


class Sink:
    """A no-op sink: subclasses override what they need."""

    name = "sink"

    def record(self, record: dict[str, Any], frame: Frame) -> None:
        pass

    def event(self, event: Event, frame: Frame) -> None:
        pass

    def stats(self, stats: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _FailureLog:
    """Logs a sink's write failures without flooding a months-long journal: the first one, a reminder every few
    minutes with the count, and the recovery."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing_since: float | None = None
        self.dropped = 0
        self._reminded = 0.0

    def failed(self, detail: str) -> None:
        now = time.monotonic()
        self.dropped += 1
        if self.failing_since is None:
            self.failing_since = self._reminded = now
            log.error("%s: %s; dropping until it works again (retrying every %.0f s)", self.what, detail, RETRY_S)
        elif now - self._reminded >= REMIND_S:
            self._reminded = now
            log.error("%s: still failing (%s); %d dropped so far", self.what, detail, self.dropped)

    def succeeded(self) -> None:
        if self.failing_since is not None:
            log.warning("%s: working again after %.0f s; %d dropped", self.what, time.monotonic() - self.failing_since,
                        self.dropped)  # fmt: skip
            self.failing_since, self.dropped = None, 0


class JsonlSink(Sink):
    """One JSON record per line, written and flushed per frame, to a file (appended) or stdout.

    The file is written with one write() per line on an O_APPEND descriptor: a reader (`tail -f`, a log shipper)
    never sees half a line, and a line cut short by a full disk is truncated away, so the file stays valid JSONL.
    """

    name = "jsonl"

    def __init__(self, path: Path | None, *, retry_s: float = RETRY_S) -> None:
        self.path = path
        self._retry_s = retry_s
        self._fd: int | None = None
        self._retry_at = 0.0
        self._failures = _FailureLog(f"jsonl {path}")

    def record(self, record: dict[str, Any], frame: Frame) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        if self.path is None:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except BrokenPipeError:
                raise StopWatching("stdout was closed") from None
            return
        self._write(line.encode())

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            if time.monotonic() < self._retry_at:
                self._failures.failed("not writable")
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                self._retry_at = time.monotonic() + self._retry_s
                self._failures.failed(f"cannot open: {exc.strerror or exc}")
                return
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            self._undo_partial_line(written)
            os.close(self._fd)
            self._fd = None
            self._retry_at = time.monotonic() + self._retry_s
            self._failures.failed(f"cannot write: {exc.strerror or exc}")
            return
        self._failures.succeeded()

    def _undo_partial_line(self, written: int) -> None:
        if not written:
            return
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            os.ftruncate(self._fd, end - written)
        except OSError:
            pass  # the next reader sees one broken line; nothing more can be done on a failing disk

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FrameSaver(Sink):
    """`--save DIR`: the frames that fired an event, as JPEG (frames) or a copy of the image file (folders),
    named `<UTC time>_<frame>_<label>_<prob>.<ext>` so the folder sorts by time. At most `max_files` files and
    `max_bytes` bytes: the oldest saved files are removed first. Files not named by this saver are never touched
    (nor counted)."""

    name = "save"
    SAVED_NAME = re.compile(r"^\d{8}T\d{6}\.\d{3}Z_\d+_.+\.[A-Za-z0-9]+$")
    JPEG_QUALITY = 90

    def __init__(self, folder: Path, *, max_files: int | None = None, max_bytes: int | None = None) -> None:
        self.folder = folder
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._saved: deque[tuple[Path, int]] = deque()
        self._bytes = 0
        self._last_frame: tuple[str, int] | None = None
        self._last_path: Path | None = None
        self._failures = _FailureLog(f"save {folder}")
        self._indexed = False

    def _index_existing(self) -> None:
        """Files saved by earlier runs count towards the limits, so restarts cannot grow the folder forever."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.folder):
            if entry.is_file() and self.SAVED_NAME.match(entry.name):
                found.append((entry.name, Path(entry.path), entry.stat().st_size))
        for _, path, size in sorted(found):
            self._saved.append((path, size))
            self._bytes += size
        self._indexed = True
        self._evict()

    def event(self, event: Event, frame: Frame) -> None:
        key = (frame.source, frame.number)
        if key == self._last_frame:  # two rules fired on one frame: one copy is enough
            return
        try:
            if not self._indexed:
                self._index_existing()
            path = self._write(event, frame)
        except OSError as exc:
            self._failures.failed(f"cannot save frame {frame.number}: {exc.strerror or exc}")
            return
        self._last_frame, self._last_path = key, path
        self._failures.succeeded()
        size = path.stat().st_size
        self._saved.append((path, size))
        self._bytes += size
        self._evict()
        log.info("event %s: %s %.2f on frame %d, saved %s", event.rule, event.label, event.prob, frame.number, path)

    def saved_path(self, frame: Frame) -> Path | None:
        """The file saved for `frame` (None if saving it failed), for sinks after this one (MQTT events)."""
        return self._last_path if self._last_frame == (frame.source, frame.number) else None

    def _write(self, event: Event, frame: Frame) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(frame.wall_time))
        millis = int(frame.wall_time * 1000) % 1000
        label = re.sub(r"[^A-Za-z0-9]+", "-", event.label).strip("-") or "class"
        stem = f"{stamp}.{millis:03d}Z_{frame.number}_{label}_{event.prob:.2f}"
        if frame.path is not None:
            data = frame.path.read_bytes()
            suffix = frame.path.suffix.lower() or ".jpg"
        else:
            import cv2

            ok, encoded = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.JPEG_QUALITY])
            if not ok:
                raise OSError(errno.EINVAL, "JPEG encoding failed")
            data, suffix = encoded.tobytes(), ".jpg"
        path = self.folder / f"{stem}{suffix}"
        partial = self.folder / f".{stem}{suffix}.partial"
        try:
            partial.write_bytes(data)
            os.replace(partial, path)  # a power cut never leaves a half-written image under a real name
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        return path

    def _evict(self) -> None:
        while self._saved and (
            (self.max_files is not None and len(self._saved) > self.max_files)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            path, size = self._saved.popleft()
            self._bytes -= size
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("save: cannot remove %s: %s", path, exc.strerror or exc)


class StatsLogSink(Sink):
    """The live statistics line on stderr (through logging), and the summary at exit."""

    name = "stats-log"

    def stats(self, stats: dict[str, Any]) -> None:
        log.info("%s", format_stats(stats))


class HeartbeatSink(Sink):
    """Touches a file after processed frames, so a supervisor (the image's HEALTHCHECK, a systemd watchdog
    script) can tell a working loop from a stalled one by the file's age. At most once per `every_s`, to
    spare SD cards a metadata write per frame."""

    name = "heartbeat"

    def __init__(self, path: Path, *, every_s: float = 5.0) -> None:
        self.path = path
        self.every_s = every_s
        self.last = float("-inf")
        self.failures = _FailureLog(f"heartbeat {path}")

    def record(self, record: dict[str, Any], frame: Frame) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        try:
            self.path.touch()
        except OSError as exc:
            self.failures.failed(exc.strerror or str(exc))
        else:
            self.failures.succeeded()


def parse_save_limits(values: list[str]) -> tuple[int | None, int | None]:
    """--save-max values -> (max files, max bytes). A plain number is a file count; a number with a unit
    (500MB, 2GB, 1.5GiB) is a size. Values may be repeated or comma-separated: "500,2GB"."""
    max_files = max_bytes = None
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", part)
            if not match or match[2].lower() not in SIZE_UNITS:
                raise UsageError(f"--save-max {part!r}: expected a file count (500) or a size (500MB, 2GB)")
            number, unit = float(match[1]), match[2].lower()
            if not unit:
                if not number.is_integer() or number < 1:
                    raise UsageError(f"--save-max {part!r}: a file count is a whole number from 1")
                max_files = int(number)
            else:
                if number <= 0:
                    raise UsageError(f"--save-max {part!r}: a size must be positive")
                max_bytes = int(number * SIZE_UNITS[unit])
    return max_files, max_bytes
