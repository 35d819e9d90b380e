"""Where `sbcrt watch` gets frames: the source argument -> a FrameSource.

Kinds, recognised in this order:
- `picamera2` / `picamera2:N`: a Raspberry Pi ribbon camera through libcamera (OpenCV cannot read these on current
  Raspberry Pi OS);
- a camera index (`0`) or a device path (`/dev/video0`): OpenCV's V4L2 backend;
- `rtsp://`, `rtsps://`, `rtmp://`, `http://`, `https://`: a network stream through OpenCV's FFmpeg backend, with
  open and read timeouts so a dead camera can never hang the capture;
- an existing folder: watched for new images;
- an existing file: a video, read frame by frame in order;
- a pattern with `*`, `?` or `[`: a glob watched for new images (an existing path is a path first, so a folder
  named `cam [1]` is that folder, not a pattern matching `cam 1`).

Live sources (cameras, streams) run a capture thread that keeps only the newest frame: a slow model never works
through a backlog of old frames, and every frame replaced before the loop took it is counted as skipped.
Video files and watched folders are read on the loop's own thread, in order, nothing dropped (except what
`--stride`/`--fps` subsample from a video).

Failures are split three ways so the loop can decide: SourceUnavailable (open failed; may work later),
SourceLost (a working source stopped; reopen it), SourceEnded (a video file is finished).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.image_files import IMAGE_EXTENSIONS
from sbcrt.watch.types import Frame
from sbcrt.watch.urls import redact_url

log = logging.getLogger("sbcrt.watch")

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
# Names uploaders give a file while it is still arriving (FTP clients, browsers, rsync uses a leading dot).
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".filepart", ".download")
PICAMERA2_DEFAULT_SIZE = (1280, 720)
PICAMERA2_MISSING = (
    "picamera2 is not installed in this Python: on Raspberry Pi OS run `sudo apt install python3-picamera2` and "
    "create the virtual environment with --system-site-packages (picamera2 needs the system's libcamera)"
)
# How long close() waits for a capture thread to leave a blocking read before abandoning it (it is a daemon).
CAPTURE_JOIN_TIMEOUT_S = 2.0


class SourceUnavailable(Exception):
    """The source could not be opened now (camera unplugged, stream down, folder not mounted)."""


class SourceLost(Exception):
    """A source that was working stopped delivering frames: close it and open it again."""


class SourceEnded(Exception):
    """A finite source (a video file) has no more frames."""


@dataclass(frozen=True)
class SourceOptions:
    """The source-specific flags of `sbcrt watch`."""

    resolution: tuple[int, int] | None = None  # cameras: requested capture size (width, height)
    timeout_s: float = 5.0  # streams: FFmpeg open and read timeouts
    fps: float | None = None  # video files: sample this many frames per second of video; others: a wall-clock cap
    stride: int | None = None  # video files: every Nth frame
    new_only: bool = False  # folders and globs: skip the images already there at start
    settle_s: float = 1.0  # folders and globs: a file is read once unchanged for this long


class FrameSource:
    """What the loop needs from a source. `frames_read`/`frames_skipped` only grow (across reopens too)."""

    kind = "source"
    live = False  # frames arrive on their own clock; the newest one is what matters
    reconnects = True  # an open failure means "try again later", not "bad argument"

    def __init__(self, name: str) -> None:
        self.name = name
        # The most frames per wall-clock second the loop may take (--fps); None: as fast as they come. A video
        # file keeps None: it applies --fps itself, on the video's clock.
        self.max_fps: float | None = None
        self.frames_read = 0
        self.frames_skipped = 0

    def open(self) -> None:
        """Start delivering frames; raises SourceUnavailable."""

    def next_frame(self, timeout: float) -> Frame | None:
        """The next frame, or None if none arrived within `timeout` s; raises SourceLost or SourceEnded."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device; safe to call twice and after a failed open."""

    def describe(self) -> str:
        return f"{self.kind} {self.name}"


# -- live sources: a capture thread keeps only the newest frame ------------------------------------------------


class LatestFrameCapture(FrameSource):
    """Base of live sources: a daemon thread reads frames as fast as the device delivers them and keeps only the
    newest; the loop takes it when it is ready for the next one. Subclasses open, read and release the device."""

    live = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._next_number = 0  # keeps counting across reopens, so frame numbers never repeat in one run

    def _open_device(self) -> Any:
        raise NotImplementedError

    def _read(self, device: Any) -> Any:
        """One frame (HxWx3 BGR array), or None when the device stopped delivering."""
        raise NotImplementedError

    def _release(self, device: Any) -> None:
        raise NotImplementedError

    def open(self) -> None:
        device = self._open_device()
        stop = threading.Event()
        with self._cond:
            self._latest, self._failure = None, None
        self._stop = stop
        self._thread = threading.Thread(
            target=self._capture, args=(device, stop), name=f"sbcrt-capture {self.name}", daemon=True
        )
        self._thread.start()

    def _capture(self, device: Any, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                reason = "no frame (the stream ended or the read timed out)"
                try:
                    image = self._read(device)
                except Exception as exc:  # a driver or library error must end this capture, not the process
                    image, reason = None, f"read failed: {type(exc).__name__}: {exc}"
                wall, now = time.time(), time.perf_counter()
                with self._cond:
                    if stop.is_set():  # closed while reading: this thread no longer owns the source's state
                        return
                    if image is None:
                        self._failure = reason
                        self._cond.notify_all()
                        return
                    if self._latest is not None:  # the loop never took it: replaced by a newer frame
                        self.frames_skipped += 1
                    self._latest = Frame(self._next_number, wall, now, time.monotonic(), self.name, image=image)
                    self._next_number += 1
                    self.frames_read += 1
                    self._cond.notify_all()
        finally:
            try:
                self._release(device)
            except Exception as exc:
                log.debug("releasing %s failed: %s", self.name, exc)

    def next_frame(self, timeout: float) -> Frame | None:
        with self._cond:
            if self._latest is None and self._failure is None:
                self._cond.wait(timeout)
            frame, self._latest = self._latest, None
            if frame is None and self._failure is not None:
                raise SourceLost(self._failure)
            return frame

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(CAPTURE_JOIN_TIMEOUT_S)
            if thread.is_alive():
                # Blocked inside a driver call that has no timeout. It is a daemon and releases the device when
                # (if) the call returns; reopening may see "device busy" until then, which the backoff absorbs.
                log.warning("%s: the capture thread is stuck in a read; abandoning it", self.name)
        with self._cond:
            self._latest, self._failure = None, None


class OpenCVCapture(LatestFrameCapture):
    """A V4L2 camera (index or /dev/videoN) or a network stream (FFmpeg), read with cv2.VideoCapture."""

    def __init__(self, name: str, target: int | str, *, kind: str, options: SourceOptions) -> None:
        super().__init__(name)
        self.kind = kind  # "camera" or "stream"
        self._target = target
        self._options = options
        self.max_fps = options.fps

    def _open_device(self) -> Any:
        cv2 = import_cv2()
        timeout_ms = int(self._options.timeout_s * 1000)
        if self.kind == "stream":
            if self._target.lower().startswith("rtsp") and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
                # FFmpeg's default RTSP transport is UDP, which loses packets (grey smears) and does not pass NAT;
                # IP cameras all speak RTSP over TCP. A user can still choose with OPENCV_FFMPEG_CAPTURE_OPTIONS.
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
            capture = cv2.VideoCapture(self._target, cv2.CAP_FFMPEG, params)
        else:
            backend = cv2.CAP_V4L2 if os.name == "posix" and not _is_macos() else cv2.CAP_ANY
            capture = cv2.VideoCapture(self._target, backend)
        if not capture.isOpened():
            capture.release()
            if self.kind == "stream":
                raise SourceUnavailable("cannot open the stream (unreachable, refused, or no video in it)")
            raise SourceUnavailable("cannot open the camera (not connected, or in use by another program)")
        if self.kind == "camera":
            # One driver buffer: V4L2 otherwise queues 4 frames, so even the "newest" frame would be ~4 old.
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self._options.resolution:
                width, height = self._options.resolution
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        return capture

    def _read(self, capture: Any) -> Any:
        ok, image = capture.read()
        return image if ok and image is not None else None

    def _release(self, capture: Any) -> None:
        capture.release()


class Picamera2Capture(LatestFrameCapture):
    """A Raspberry Pi ribbon camera through picamera2 (libcamera)."""

    kind = "picamera2"

    def __init__(self, name: str, camera_num: int, options: SourceOptions) -> None:
        super().__init__(name)
        self._camera_num = camera_num
        self._size = options.resolution or PICAMERA2_DEFAULT_SIZE
        self.max_fps = options.fps

    def _open_device(self) -> Any:
        from picamera2 import Picamera2

        try:
            camera = Picamera2(self._camera_num)
        except Exception as exc:  # IndexError (no such camera) or RuntimeError (in use, libcamera failure)
            raise SourceUnavailable(f"cannot open camera {self._camera_num}: {type(exc).__name__}: {exc}") from None
        try:
            # "RGB888" is libcamera's name for 24-bit pixels stored B, G, R in memory: OpenCV's BGR order.
            config = camera.create_video_configuration(main={"size": self._size, "format": "RGB888"})
            camera.configure(config)
            camera.start()
        except Exception as exc:
            camera.close()
            raise SourceUnavailable(f"cannot start camera {self._camera_num}: {type(exc).__name__}: {exc}") from None
        return camera

    def _read(self, camera: Any) -> Any:
        return camera.capture_array("main")

    def _release(self, camera: Any) -> None:
        try:
            camera.stop()
        finally:
            camera.close()


# -- video files: every frame in order, read on the loop's thread ---------------------------------------------


class VideoFileSource(FrameSource):
    """A video file, every frame in order unless subsampled: `stride` keeps every Nth frame, `fps` keeps the
    frames nearest to each 1/fps step of video time (not wall time: a file is processed as fast as possible)."""

    kind = "video"
    reconnects = False

    def __init__(self, name: str, path: Path, options: SourceOptions) -> None:
        super().__init__(name)
        self._path = path
        self._stride = options.stride
        self._sample_fps = options.fps
        self._capture: Any = None
        self._video_fps = 0.0
        self._position = 0
        self._next_sample_s = 0.0

    def open(self) -> None:
        cv2 = import_cv2()
        capture = cv2.VideoCapture(str(self._path))
        if not capture.isOpened():
            capture.release()
            raise SourceUnavailable("OpenCV cannot read it as a video")
        self._capture = capture
        fps = capture.get(cv2.CAP_PROP_FPS)
        self._video_fps = fps if fps and math.isfinite(fps) and fps > 0 else 0.0
        if self._sample_fps and not self._video_fps:
            log.warning("%s: the file does not say its frame rate; sampling assumes 30 fps", self.name)
            self._video_fps = 30.0
        self._position, self._next_sample_s = 0, 0.0

    def _wanted(self, index: int) -> bool:
        if self._stride:
            return index % self._stride == 0
        if self._sample_fps:
            position_s = index / self._video_fps
            # Half a frame of tolerance, so 30 fps sampled at 10 fps keeps exactly every third frame.
            if position_s + 0.5 / self._video_fps >= self._next_sample_s:
                while self._next_sample_s <= position_s + 0.5 / self._video_fps:
                    self._next_sample_s += 1.0 / self._sample_fps
                return True
            return False
        return True

    def next_frame(self, timeout: float) -> Frame | None:
        if self._capture is None:
            raise SourceEnded()
        start = time.perf_counter()
        while True:
            # grab() demuxes and decodes; retrieve() only converts, so skipped frames cost less.
            if not self._capture.grab():
                raise SourceEnded()
            index = self._position
            self._position += 1
            self.frames_read += 1
            if self._wanted(index):
                break
            self.frames_skipped += 1
        ok, image = self._capture.retrieve()
        if not ok or image is None:
            raise SourceEnded()
        now = time.perf_counter()
        media = index / self._video_fps if self._video_fps else float(index)
        return Frame(index, time.time(), now, media, self.name, image=image, capture_ms=(now - start) * 1000)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# -- folders and globs: new image files, each read once it has stopped changing -------------------------------


class WatchedImages(FrameSource):
    """Image files appearing in a folder (or matching a glob), oldest first, each once.

    A file is read when it has stopped changing: the same size and mtime seen `settle_s` apart, and its mtime at
    least `settle_s` old, so a photo still arriving over FTP is not read half-done. Hidden files and names that
    uploaders use for partial files are ignored. A file replaced later (new size or mtime) is read again.
    Memory: one entry per file currently in the folder (entries of deleted files are dropped).
    """

    kind = "folder"

    def __init__(
        self, name: str, list_files: Callable[[], Iterable[str]], *, folder: Path | None, options: SourceOptions
    ) -> None:
        super().__init__(name)
        if folder is None:
            self.kind = "glob"
        self._list_files = list_files
        self._folder = folder
        self.max_fps = options.fps
        self._settle_s = options.settle_s
        self._new_only = options.new_only
        self._poll_s = min(1.0, max(0.1, options.settle_s / 2))
        self._done: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) when it was queued
        self._pending: dict[str, tuple[tuple[int, int], float]] = {}  # path -> (signature, first seen)
        self._ready: deque[str] = deque()
        self._next_scan = 0.0
        self._started = False

    def open(self) -> None:
        if self._folder is not None and not self._folder.is_dir():
            raise SourceUnavailable("the folder does not exist (not mounted?)")
        if not self._started:
            self._started = True
            if self._new_only:
                self._skip_existing()
        self._next_scan = 0.0

    def _skip_existing(self) -> None:
        now = time.time()
        for name, info in self._listing():
            # A file still being written at start is arriving, not existing: it is read when done.
            if now - info.st_mtime >= self._settle_s:
                self._done[name] = (info.st_size, info.st_mtime_ns)

    def _listing(self) -> list[tuple[str, os.stat_result]]:
        try:
            names = list(self._list_files())
        except OSError as exc:
            raise SourceLost(f"cannot list the folder: {exc.strerror or exc}") from None
        entries = []
        for name in names:
            base = os.path.basename(name)
            if base.startswith(".") or base.lower().endswith(PARTIAL_SUFFIXES):
                continue
            if os.path.splitext(base)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                info = os.stat(name)
            except OSError:  # deleted between listing and stat
                continue
            if stat.S_ISREG(info.st_mode):
                entries.append((name, info))
        return entries

    def _scan(self) -> None:
        now, wall = time.monotonic(), time.time()
        ready: list[tuple[int, str]] = []
        present = set()
        for name, info in self._listing():
            present.add(name)
            signature = (info.st_size, info.st_mtime_ns)
            if self._done.get(name) == signature:
                continue
            seen = self._pending.get(name)
            if seen is None or seen[0] != signature:
                self._pending[name] = (signature, now)
                continue
            settled = now - seen[1] >= self._settle_s and wall - info.st_mtime >= self._settle_s
            if settled and info.st_size > 0:
                ready.append((info.st_mtime_ns, name))
                self._done[name] = signature
                del self._pending[name]
        for table in (self._done, self._pending):
            for gone in [name for name in table if name not in present]:
                del table[gone]
        self._ready.extend(name for _, name in sorted(ready))

    def next_frame(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        while not self._ready:
            now = time.monotonic()
            if now >= self._next_scan:
                self._scan()
                self._next_scan = now + self._poll_s
                continue
            if now >= deadline:
                return None
            time.sleep(min(deadline, self._next_scan) - now)
        if self._folder is not None and not self._folder.is_dir():
            raise SourceLost("the folder disappeared")
        path = self._ready.popleft()
        number = self.frames_read
        self.frames_read += 1
        return Frame(number, time.time(), time.perf_counter(), time.monotonic(), path, path=Path(path))


# -- the source argument ---------------------------------------------------------------------------------------

VIDEO_DEVICE = re.compile(r"^/dev/")
PICAMERA2 = re.compile(r"^picamera2(?::(\d+))?$", re.IGNORECASE)


def parse_source(text: str, options: SourceOptions) -> FrameSource:
    """The FrameSource a user means by `text`; raises UsageError (one line) when it is none of the kinds."""
    text = text.strip()
    if not text:
        raise UsageError("empty source")
    picamera = PICAMERA2.match(text)
    if picamera:
        if importlib.util.find_spec("picamera2") is None:
            raise UsageError(PICAMERA2_MISSING)
        source: FrameSource = Picamera2Capture(text.lower(), int(picamera.group(1) or 0), options)
    elif text.isdigit():
        source = OpenCVCapture(f"/dev/video{int(text)}", int(text), kind="camera", options=options)
    elif VIDEO_DEVICE.match(text):
        source = OpenCVCapture(text, text, kind="camera", options=options)
    elif "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in STREAM_SCHEMES:
            raise UsageError(
                f"unsupported stream {scheme}:// (use one of {', '.join(s + '://' for s in STREAM_SCHEMES)})"
            )
        source = OpenCVCapture(redact_url(text), text, kind="stream", options=options)
    elif os.path.isdir(text):
        folder = Path(text)
        source = WatchedImages(
            text, lambda: (entry.path for entry in os.scandir(folder)), folder=folder, options=options
        )
    elif os.path.isfile(text):
        if Path(text).suffix.lower() in IMAGE_EXTENSIONS:
            raise UsageError(f"{text} is a single image: classify it with `sbcrt classify`, or watch its folder")
        source = VideoFileSource(text, Path(text), options)
        try:
            source.open()  # a file OpenCV cannot read is a bad argument: say so before loading the model
        except SourceUnavailable as exc:
            raise UsageError(f"{text}: {exc}") from None
        finally:
            source.close()
    elif glob.has_magic(text):
        source = WatchedImages(text, lambda: glob.iglob(text, recursive=True), folder=None, options=options)
    else:
        raise UsageError(
            f"{text}: no such file or folder (a source is a camera index, /dev/videoN, picamera2, an rtsp:// or "
            "http(s):// URL, a video file, a folder or a quoted glob)"
        )
    _check_options(source, options)
    return source


def _check_options(source: FrameSource, options: SourceOptions) -> None:
    kind = source.kind
    if options.stride and kind != "video":
        raise SettingError(
            "stride", "applies to video files; use {fps} to cap the rate of other sources", cites=["fps"]
        )
    if options.resolution and kind not in ("camera", "picamera2"):
        raise SettingError("resolution", "applies to cameras (an index, /dev/videoN or picamera2)")
    if options.new_only and kind not in ("folder", "glob"):
        raise SettingError("new_only", "applies to folders and globs")


def import_cv2() -> Any:
    from sbcrt.runtime.preprocess import require_opencv

    return require_opencv("cameras, streams and videos")


def _is_macos() -> bool:
    return os.uname().sysname == "Darwin"
