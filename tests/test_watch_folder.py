"""`sbcrt watch` on folders and globs: photos already there and photos arriving during the run (some written
slowly, some renamed from a partial name, one corrupt), --new-only, globs over subfolders, a folder that goes
away and comes back."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sbcrt.runtime.classifier import Classifier
from sbcrt.watch.loop import LoopOptions, WatchLoop
from sbcrt.watch.sinks import Sink, StopWatching
from sbcrt.watch.sources import SourceOptions, parse_source
from sbcrt.watch.types import Record
from tests.support.watch import SAMPLES, WatchProcess, read_jsonl


def photo_bytes(seed: int) -> bytes:
    """A JPEG whose top and bottom halves differ, so a half-read file would give other channel means."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((240, 320, 3), np.uint8)
    pixels[:120] = rng.integers(0, 256, 3)
    pixels[120:] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def write_slowly(path: Path, data: bytes, chunks: int, pause_s: float) -> float:
    """Write in chunks with pauses, like an FTP upload from a trail camera; returns when it was complete."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            time.sleep(pause_s)
    return time.time()


def test_folder_with_photos_arriving_during_the_run(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "trailcam"
    folder.mkdir()
    shutil.copy(SAMPLES / "chelsea.png", folder / "a-old.png")
    time.sleep(0.05)
    shutil.copy(SAMPLES / "coffee.png", folder / "b-old.png")
    (folder / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "out.jsonl"
    watcher = WatchProcess(
        str(folder), "--model", str(runtime_models["probe"]), "-k", "3", "--settle", "0.6", "--jsonl", str(out)
    )
    try:
        watcher.wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 30, "the two photos")
        # Arrives in 6 chunks, 0.25 s apart: each pause is shorter than --settle, so it must wait for all.
        slow = photo_bytes(1)
        completed = write_slowly(folder / "c-slow.jpg", slow, chunks=6, pause_s=0.25)
        # Uploaded under a partial name, then renamed: read once, under its final name.
        (folder / "d-upload.jpg.part").write_bytes(photo_bytes(2))
        (folder / ".hidden.jpg").write_bytes(photo_bytes(3))
        time.sleep(0.8)
        (folder / "d-upload.jpg.part").rename(folder / "d-upload.jpg")
        (folder / "e-broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
        watcher.wait_for(lambda: watcher.count("e-broken.jpg: skipped") == 1, 30, "the broken file")
        watcher.wait_for(lambda: len(out.read_text().splitlines()) == 4, 30, "the new photos")
        time.sleep(1.0)  # nothing else must turn up (no second read, no hidden or partial file)
        assert watcher.signal(signal.SIGTERM) == 0
    finally:
        watcher.kill()
    records = read_jsonl(out)
    assert [Path(r["source"]).name for r in records] == ["a-old.png", "b-old.png", "c-slow.jpg", "d-upload.jpg"]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    slow_record = records[2]
    assert slow_record["time"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(completed))
    # What the model saw is the whole photo: the same scores as classifying the finished file.
    probe = Classifier(runtime_models["probe"], threads=1, spin=False, cache_dir=False)
    expected = probe.classify(folder / "c-slow.jpg", top_k=3).to_dict()["topk"]
    assert slow_record["topk"] == expected
    assert records[2]["timing_ms"]["capture"] > 0  # file decoding is the capture stage
    summary = next(line for line in watcher.stderr_lines if "summary:" in line)
    assert "summary: 4 frames" in summary and "errors 1" in summary


class Collect(Sink):
    """Collects records; stops the loop once `until(records)` holds."""

    def __init__(self, until: Callable[[list[dict]], bool]) -> None:
        self.records: list[dict] = []
        self.until = until

    def record(self, record: Record, frame) -> None:
        self.records.append(record.to_json())
        if self.until(self.records):
            raise StopWatching("done")


def run_loop(source, classifier, sink: Sink, *, options: LoopOptions | None = None, limit_s: float = 30.0):
    loop = WatchLoop(source, classifier, [sink], options=options or LoopOptions(backoff_initial_s=0.1))
    timer = threading.Timer(limit_s, loop.stop)  # a test that never sees its records fails instead of hanging
    timer.start()
    try:
        return loop.run()
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def tiny(runtime_models: dict[str, Path]) -> Classifier:
    return Classifier(runtime_models["tiny"], threads=1, spin=False, cache_dir=False)


def later(delay_s: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay_s, action)
    timer.start()
    return timer


def test_new_only_skips_existing_photos(tiny: Classifier, tmp_path: Path) -> None:
    (tmp_path / "old.jpg").write_bytes(photo_bytes(1))
    old = time.time() - 60
    os.utime(tmp_path / "old.jpg", (old, old))
    source = parse_source(str(tmp_path), SourceOptions(new_only=True, settle_s=0.2))
    sink = Collect(lambda records: len(records) == 1)
    writer = later(0.5, lambda: (tmp_path / "new.jpg").write_bytes(photo_bytes(2)))
    run_loop(source, tiny, sink)
    writer.join()
    assert [Path(r["source"]).name for r in sink.records] == ["new.jpg"]


def test_glob_over_subfolders(tiny: Classifier, tmp_path: Path) -> None:
    for camera in ("pen1", "pen2"):
        (tmp_path / camera).mkdir()
    (tmp_path / "pen1" / "one.jpg").write_bytes(photo_bytes(1))
    (tmp_path / "pen1" / "skip.png").write_bytes((SAMPLES / "chelsea.png").read_bytes())
    source = parse_source(str(tmp_path / "*" / "*.jpg"), SourceOptions(settle_s=0.2))
    assert source.kind == "glob"
    sink = Collect(lambda records: len(records) == 2)
    writer = later(0.5, lambda: (tmp_path / "pen2" / "two.jpg").write_bytes(photo_bytes(2)))
    run_loop(source, tiny, sink)
    writer.join()
    assert [Path(r["source"]).relative_to(tmp_path).as_posix() for r in sink.records] == [
        "pen1/one.jpg",
        "pen2/two.jpg",
    ]


def test_folder_that_disappears_is_reopened(tiny: Classifier, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "mount"
    folder.mkdir()
    (folder / "first.jpg").write_bytes(photo_bytes(1))
    source = parse_source(str(folder), SourceOptions(settle_s=0.2))

    def unmount_and_remount(records: list[dict]) -> bool:
        if len(records) == 1:
            shutil.rmtree(folder)  # the USB stick or network share goes away...

            def remount() -> None:
                folder.mkdir()
                (folder / "second.jpg").write_bytes(photo_bytes(2))

            later(0.8, remount)  # ...and comes back with a new photo
        return len(records) == 2

    sink = Collect(unmount_and_remount)
    logging.getLogger("sbcrt.watch").propagate = True
    with caplog.at_level(logging.INFO, logger="sbcrt.watch"):
        stats = run_loop(source, tiny, sink)
    assert [Path(r["source"]).name for r in sink.records] == ["first.jpg", "second.jpg"]
    assert stats.reconnects >= 1
    messages = [r.message for r in caplog.records]
    assert any("lost: cannot list the folder" in m for m in messages), messages
    assert any("frames again after" in m for m in messages), messages
