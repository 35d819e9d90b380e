"""Where `sbcrt watch` results go: the Sink interface and the sinks that write files or log.

Every sink is a subclass of `Sink` and gets the same four calls from the loop (loop.py), on the loop's thread:

    record(record, frame)   once per processed frame: the Record (types.py; `record.to_json()` is the JSON line)
                            and the Frame it describes
    event(event, frame)     once per fired rule (events.py), after every sink got the frame's record
    stats(stats)            every --stats-interval seconds (also while a source is down and reconnecting), and
                            once with stats["final"] = True at exit: the dict of WatchStats.snapshot()
    close()                 at exit, after the final stats

The base class does nothing for each call, so a sink overrides only what it uses. A sink must not block: one
that talks to the network (MQTT, an HTTP server) hands the data to its own thread through a bounded queue. A sink
that raises is logged and skipped for that call; the loop goes on. A sink raises StopWatching to end the run
(e.g. stdout closed by `| head`). A sink that adds to events (the saver puts its file on `event.snapshot`) sets
`enriches_events = True`: the loop gives it each event before the other sinks, whatever their order.

Sinks that write files survive a full disk and unwritable folders: they log the problem once (FailureLog), drop
what they cannot write, retry later and log again when writing works.
"""

from __future__ import annotations

import contextlib
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

from sbcrt.errors import SettingError
from sbcrt.watch.stats import format_stats
from sbcrt.watch.types import Event, Frame, Record

log = logging.getLogger("sbcrt.watch")

RETRY_S = 10.0  # how often a failing file sink tries again
REMIND_S = 300.0  # how often something that keeps failing says so again (sinks, the MQTT broker)
SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
SIZE_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4})


class StopWatching(Exception):
    """Raised by a sink to end the run cleanly."""


class Sink:
    """The interface every sink implements (see the module docstring); each call does nothing here."""

    name = "sink"  # for log lines about this sink
    enriches_events = False  # True: gets each event before the other sinks (it adds to the event)

    def record(self, record: Record, frame: Frame) -> None:
        pass

    def event(self, event: Event, frame: Frame) -> None:
        pass

    def stats(self, stats: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class FailureLog:
    """Decides when a repeated failure is worth a log line, so a months-long journal is not flooded: the first
    failure, then a reminder every `remind_s`, then the recovery. The caller words the lines."""

    def __init__(self, *, remind_s: float = REMIND_S) -> None:
        self.remind_s = remind_s
        self.failing_since: float | None = None
        self.count = 0  # failures since the first one
        self._reminded = 0.0

    def failed(self) -> str | None:
        """Count one failure: "first" or "reminder" when it should be logged now, else None."""
        now = time.monotonic()
        self.count += 1
        if self.failing_since is None:
            self.failing_since = self._reminded = now
            return "first"
        if now - self._reminded >= self.remind_s:
            self._reminded = now
            return "reminder"
        return None

    def recovered(self) -> tuple[float, int] | None:
        """Working again: (seconds it failed, failures counted), or None if it was not failing; resets."""
        if self.failing_since is None:
            return None
        result = (time.monotonic() - self.failing_since, self.count)
        self.failing_since, self.count = None, 0
        return result


class _WriteFailures:
    """A file sink's write failures, logged through FailureLog: what was dropped, and when writing works again."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._log = FailureLog()

    @property
    def dropped(self) -> int:
        return self._log.count

    def failed(self, detail: str) -> None:
        when = self._log.failed()
        if when == "first":
            log.error("%s: %s; dropping until it works again (retrying every %.0f s)", self.what, detail, RETRY_S)
        elif when == "reminder":
            log.error("%s: still failing (%s); %d dropped so far", self.what, detail, self._log.count)

    def succeeded(self) -> None:
        recovered = self._log.recovered()
        if recovered is not None:
            log.warning("%s: working again after %.0f s; %d dropped", self.what, *recovered)


class JsonlSink(Sink):
    """One JSON record per line, written per frame, to a file (appended) or stdout.

    Each line is one write() on the descriptor (O_APPEND for a file): a reader (`tail -f`, a log shipper) never
    sees half a line, and a line cut short by a full disk is truncated away, so the output stays valid JSONL.
    Stdout is written the same way when it is a file (`> out.jsonl` on a full disk): its failures are logged once,
    not per frame. A closed pipe (`| head`) ends the run.
    """

    name = "jsonl"

    def __init__(self, path: Path | None, *, retry_s: float = RETRY_S) -> None:
        self.path = path
        self._retry_s = retry_s
        self._fd: int | None = None
        self._retry_at = 0.0
        self._failures = _WriteFailures(f"jsonl {path}" if path is not None else "jsonl stdout")
        self._stdout_fd = None if path is not None else _stdout_fd()

    def record(self, record: Record, frame: Frame) -> None:
        line = json.dumps(record.to_json(), separators=(",", ":")) + "\n"
        if self.path is not None:
            self._write_file(line.encode())
        elif self._stdout_fd is not None:
            self._write_stdout(line.encode())
        else:  # stdout replaced by something without a descriptor (an embedding program, a test harness)
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except BrokenPipeError:
                raise StopWatching("stdout was closed") from None

    def _write_stdout(self, data: bytes) -> None:
        try:
            _write_line(self._stdout_fd, data)
        except BrokenPipeError:
            raise StopWatching("stdout was closed") from None
        except OSError as exc:
            self._failures.failed(f"cannot write: {exc.strerror or exc}")
            return
        self._failures.succeeded()

    def _write_file(self, data: bytes) -> None:
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
        try:
            _write_line(self._fd, data)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            self._retry_at = time.monotonic() + self._retry_s
            self._failures.failed(f"cannot write: {exc.strerror or exc}")
            return
        self._failures.succeeded()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stdout_fd() -> int | None:
    """Stdout's descriptor, after flushing what Python buffered; None when stdout has none."""
    try:
        sys.stdout.flush()
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def _write_line(fd: int, data: bytes) -> None:
    """Write all of `data`; on failure remove the part that was written (a regular file), then raise."""
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError:
        if written:
            _undo_partial_line(fd, written)
        raise


def _undo_partial_line(fd: int, written: int) -> None:
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        os.ftruncate(fd, end - written)
        os.lseek(fd, end - written, os.SEEK_SET)  # a descriptor without O_APPEND (`> file`) must not leave a hole
    except OSError:
        pass  # a pipe, or a failing disk: the reader sees one broken line; nothing more can be done


class FrameSaver(Sink):
    """`--save DIR`: the frames that fired an event, as JPEG (frames) or a copy of the image file (folders),
    named `<UTC time>_<frame>_<label>_<prob>.<ext>` so the folder sorts by time. At most `max_files` files and
    `max_bytes` bytes: the oldest saved files are removed first. Files not named by this saver are never touched
    (nor counted)."""

    name = "save"
    enriches_events = True  # puts the saved file on event.snapshot for the sinks after it (MQTT)
    SAVED_NAME = re.compile(r"^\d{8}T\d{6}\.\d{3}Z_\d+_.+\.[A-Za-z0-9]+$")
    PARTIAL_SUFFIX = ".partial"  # `.<saved name>.partial` while a file is written; renamed when complete
    STALE_PARTIAL_S = 60.0  # a partial file older than this was orphaned by a crash or power cut: removed
    JPEG_QUALITY = 90

    def __init__(self, folder: Path, *, max_files: int | None = None, max_bytes: int | None = None) -> None:
        self.folder = folder
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._saved: deque[tuple[Path, int]] = deque()
        self._bytes = 0
        self._last_frame: tuple[str, int] | None = None
        self._last_path: Path | None = None
        self._failures = _WriteFailures(f"save {folder}")
        self._indexed = False
        with contextlib.suppress(OSError):  # a folder not there or not writable yet: tried again at the first event
            self._index_existing()

    def _index_existing(self) -> None:
        """Files saved by earlier runs count towards the limits, so restarts cannot grow the folder forever; their
        orphaned partial files (a crash mid-write) are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        now = time.time()
        for entry in os.scandir(self.folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            if self.SAVED_NAME.match(entry.name):
                found.append((entry.name, Path(entry.path), entry.stat().st_size))
            elif self._is_own_partial(entry.name) and now - entry.stat().st_mtime > self.STALE_PARTIAL_S:
                try:
                    os.unlink(entry.path)
                    log.info("save: removed %s, left half-written by an earlier run", entry.path)
                except OSError as exc:
                    log.warning("save: cannot remove %s: %s", entry.path, exc.strerror or exc)
        for _, path, size in sorted(found):
            self._saved.append((path, size))
            self._bytes += size
        self._indexed = True
        self._evict()

    def _is_own_partial(self, name: str) -> bool:
        return (
            name.startswith(".")
            and name.endswith(self.PARTIAL_SUFFIX)
            and bool(self.SAVED_NAME.match(name[1 : -len(self.PARTIAL_SUFFIX)]))
        )

    def event(self, event: Event, frame: Frame) -> None:
        key = (frame.source, frame.number)
        if key == self._last_frame:  # two rules fired on one frame: one copy is enough
            event.snapshot = self._last_path
            return
        try:
            if not self._indexed:
                self._index_existing()
            path = self._write(event, frame)
        except OSError as exc:
            self._failures.failed(f"cannot save frame {frame.number}: {exc.strerror or exc}")
            return
        self._last_frame, self._last_path = key, path
        event.snapshot = path
        self._failures.succeeded()
        size = path.stat().st_size
        self._saved.append((path, size))
        self._bytes += size
        self._evict()
        log.info("event %s: %s %.2f on frame %d, saved %s", event.rule, event.label, event.prob, frame.number, path)

    def _write(self, event: Event, frame: Frame) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(frame.wall_time))
        millis = int(frame.wall_time * 1000) % 1000
        label = re.sub(r"[^A-Za-z0-9]+", "-", event.label).strip("-") or "class"
        stem = f"{stamp}.{millis:03d}Z_{frame.number}_{label}_{event.prob:.2f}"
        if frame.path is not None:
            data = frame.path.read_bytes()
            suffix = frame.path.suffix.lower() or ".jpg"
        else:
            from sbcrt.runtime.preprocess import require_opencv  # numpy and OpenCV: only once a frame is saved

            cv2 = require_opencv("JPEG snapshots")
            ok, encoded = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.JPEG_QUALITY])
            if not ok:
                raise OSError(errno.EINVAL, "JPEG encoding failed")
            data, suffix = encoded.tobytes(), ".jpg"
        path = self.folder / f"{stem}{suffix}"
        partial = self.folder / f".{stem}{suffix}{self.PARTIAL_SUFFIX}"
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
        self.failures = _WriteFailures(f"heartbeat {path}")

    def record(self, record: Record, frame: Frame) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # e.g. a fresh tmpfs: /run/sbcrt/ after a reboot
            self.path.touch()
        except OSError as exc:
            self.failures.failed(exc.strerror or str(exc))
        else:
            self.failures.succeeded()


def parse_save_limits(values: list[str]) -> tuple[int | None, int | None]:
    """Save limits -> (max files, max bytes). A plain number is a file count; a number with a unit
    (500MB, 2GB, 1.5GiB) is a size. Values may be repeated or comma-separated: "500,2GB"."""
    max_files = max_bytes = None
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", part)
            if not match or match[2].lower() not in SIZE_UNITS:
                raise SettingError("save_max", "expected a file count (500) or a size (500MB, 2GB)", part)
            number, unit = float(match[1]), match[2].lower()
            if not unit:
                if not number.is_integer() or number < 1:
                    raise SettingError("save_max", "a file count is a whole number from 1", part)
                max_files = int(number)
            else:
                if number <= 0:
                    raise SettingError("save_max", "a size must be positive", part)
                max_bytes = int(number * SIZE_UNITS[unit])
    return max_files, max_bytes
