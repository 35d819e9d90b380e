"""`sbcrt watch` against careless and hostile surroundings (issue #12): odd file names, a full disk behind stdout,
a source that stays down, crashed runs' leftovers, missing folders, noisy C++ libraries, passwords in URLs.
Every test runs the real command in a real process on real files."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sbcrt.errors import UsageError
from sbcrt.watch.mqtt import parse_mqtt_url
from sbcrt.watch.urls import redact_url
from tests.support.watch import SAMPLES, WatchProcess, numbered_frame, write_video

# Our own stderr lines: "2025-05-01 06:12:03 WARNING ..." (commands/watch.py configure_logging).
OWN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def watch_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in ("SBCRT_MODEL", "OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_LOGLEVEL")
    }


def run_watch(*args: object, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sbcrt", "watch", *map(str, args)]
    return subprocess.run(command, env=watch_env(), timeout=timeout, text=True, **kwargs)


def clip(path: Path, frames: int = 40) -> Path:
    assert write_video(path, [numbered_frame(n) for n in range(frames)], fourcc="MJPG")
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


# -- D7: an existing path is a path, even when its name looks like a glob ------------------------------------


def test_a_folder_named_like_a_glob_is_watched_as_that_folder(runtime_models, tmp_path: Path) -> None:
    folder = tmp_path / "cam [1]"  # as a glob, "[1]" would match a folder "cam 1" (which does not exist)
    folder.mkdir()
    (folder / "first.jpg").write_bytes((SAMPLES / "chelsea.png").read_bytes())  # content decides, not the suffix
    watcher = WatchProcess(str(folder), "-m", str(runtime_models["probe"]), "--settle", "0")
    try:
        watcher.wait_for(lambda: watcher.stdout_lines, 30, "a record of the image in the folder")
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
    record = json.loads(watcher.stdout_lines[0])
    assert Path(record["source"]) == folder / "first.jpg" and record["topk"]


def test_a_video_named_like_a_glob_is_read_as_that_video(runtime_models, tmp_path: Path) -> None:
    video = clip(tmp_path / "pen [3] *night*.avi", frames=12)
    done = run_watch(video, "-m", runtime_models["probe"], "-q", capture_output=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["frame"] for r in records] == list(range(12)) and {r["source"] for r in records} == {str(video)}


# -- D8: records on stdout into a full disk ------------------------------------------------------------------


def test_stdout_on_a_filling_disk_keeps_whole_lines_and_logs_once(runtime_models, tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel cut a write at the limit (a short write), then refuse the next one (EFBIG):
    # what a disk that fills up mid-line does, on a real file behind stdout (`sbcrt watch ... > out.jsonl`).
    limit = 2000  # ~4 records of ~450 bytes: the 5th is cut in the middle
    video = clip(tmp_path / "clip.avi", frames=40)
    out = tmp_path / "out.jsonl"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    with out.open("wb") as stdout:
        done = run_watch(video, "-m", runtime_models["probe"], "-q", stdout=stdout, stderr=subprocess.PIPE,
                         preexec_fn=limit_file_size)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the output ends in a torn line"
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) >= 2 and [r["frame"] for r in records] == list(range(len(records)))
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "stdout" in errors[0] and "File too large" in errors[0], done.stderr


def test_stdout_to_dev_full_logs_one_error_not_one_per_frame(runtime_models, tmp_path: Path) -> None:
    video = clip(tmp_path / "clip.avi", frames=40)
    # Opened without O_CREAT: if something replaced the device by a file (an atomic rename onto /dev/full), fail
    # here rather than append to that file.
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "/dev/full is not the character device (mknod c 1 7)"
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        done = run_watch(video, "-m", runtime_models["probe"], "-q", stdout=full, stderr=subprocess.PIPE)
    finally:
        os.close(full)
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr


# -- rough edges ---------------------------------------------------------------------------------------------


def test_quiet_silences_opencv_and_ffmpeg_too(runtime_models) -> None:
    # A refused stream makes FFmpeg print "[tcp @ 0x..] Connection ... refused" and OpenCV "[ WARN:0@..] ...",
    # straight from C++; with -q only our own lines (the retries' warnings) may reach stderr.
    url = f"http://127.0.0.1:{closed_port()}/stream.mjpg"
    watcher = WatchProcess(url, "-m", str(runtime_models["probe"]), "-q", "--timeout", "1")
    try:
        watcher.wait_for(lambda: watcher.count("cannot open") >= 2, 30, "two failed attempts")
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
    foreign = [line for line in watcher.stderr_lines if line.strip() and not OWN_LINE.match(line)]
    assert not foreign, foreign


def test_stats_lines_go_on_while_the_source_is_down(runtime_models) -> None:
    url = f"http://127.0.0.1:{closed_port()}/stream.mjpg"
    watcher = WatchProcess(url, "-m", str(runtime_models["probe"]), "--stats-interval", "0.5", "--timeout", "1")
    try:
        started = time.monotonic()
        watcher.wait_for(lambda: watcher.count(" stats: ") >= 4, 20, "stats lines while reconnecting")
        elapsed = time.monotonic() - started
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
    assert watcher.count("cannot open") >= 1 and elapsed < 10
    stats = [line for line in watcher.stderr_lines if " stats: " in line]
    assert all("processed 0.0 fps" in line for line in stats)


def test_save_folder_loses_its_own_stale_partial_files_only(runtime_models, tmp_path: Path) -> None:
    alerts = tmp_path / "alerts"
    alerts.mkdir()
    orphan = alerts / ".20250501T041203.481Z_7_red_0.91.jpg.partial"  # a power cut in the middle of a save
    fresh = alerts / ".20250501T041204.000Z_8_red_0.91.jpg.partial"  # being written right now (another run)
    users = [alerts / "notes.partial", alerts / ".upload.tmp", alerts / "report.txt"]
    for path in (orphan, fresh, *users):
        path.write_bytes(b"x" * 100)
    old = time.time() - 3600
    for path in (orphan, *users):
        os.utime(path, (old, old))
    video = clip(tmp_path / "clip.avi", frames=10)
    done = run_watch(video, "-m", runtime_models["probe"], "--when", "blue>=0.3", "--save", alerts, "-q",
                     "--jsonl", tmp_path / "out.jsonl", capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not orphan.exists() and fresh.exists() and all(path.exists() for path in users)
    assert list(alerts.glob("*.jpg"))  # the run saved its events


def test_heartbeat_folder_is_created(runtime_models, tmp_path: Path) -> None:
    heartbeat = tmp_path / "run" / "sbcrt" / "heartbeat"  # /run/sbcrt/ is gone after every reboot (tmpfs)
    video = clip(tmp_path / "clip.avi", frames=5)
    done = run_watch(video, "-m", runtime_models["probe"], "--heartbeat", heartbeat, "-q",
                     "--jsonl", tmp_path / "out.jsonl", capture_output=True)  # fmt: skip
    assert done.returncode == 0 and heartbeat.is_file(), done.stderr
    assert " ERROR " not in done.stderr


# -- passwords in URLs never reach a log line ----------------------------------------------------------------

# Pieces no other part of the URL contains, so any piece left in the redacted text is a leak.
PASSWORDS = ["Kx7@Qz9", "Kx7:Qz9", "Kx7@Qz9@Wv4", "Kx7:Qz9@Wv4:Jm2", "Kx7/Qz9", "Kx7?Qz9", "Kx7#Qz9", "Kx7%40Qz9",
             "Kx7Qz9"]  # fmt: skip


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("scheme", ["mqtt", "rtsp"])
def test_redacted_urls_keep_no_part_of_the_password(scheme: str, password: str) -> None:
    url = f"{scheme}://user:{password}@broker.lan:1883/stream"
    redacted = redact_url(url)
    assert not any(piece in redacted for piece in ("Kx7", "Qz9", "Wv4", "Jm2")), redacted
    assert redacted.startswith(f"{scheme}://user:***@") and "broker.lan" in redacted


def test_a_bad_mqtt_url_is_reported_without_its_password() -> None:
    for url in ("mqtt://user:Kx7@Qz9@broker:99999", "mqtt://user:Kx7/Qz9@broker", "mqtt://user:Kx7@Qz9@broker/x"):
        with pytest.raises(UsageError) as caught:
            parse_mqtt_url(url, env={})
        message = str(caught.value)
        assert "user:***@" in message and "Kx7" not in message and "Qz9" not in message, message


def test_urls_without_a_password_are_unchanged() -> None:
    for url in ("rtsp://10.0.0.5/s", "rtsp://user@cam/s", "http://cam:8080/a@b", "rtsp://[::1]:554/live"):
        assert redact_url(url) == url
    assert redact_url("rtsp://u:pw@[::1]:554/live") == "rtsp://u:***@[::1]:554/live"
