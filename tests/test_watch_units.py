"""`sbcrt watch` building blocks: rules with debounce and cool-down on real records, percentiles, the frame saver's
limits, the JSONL writer on a full disk, and how a source argument is recognised."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from sbcrt.commands.arguments import flag_of
from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.classifier import Classifier
from sbcrt.watch.events import EventRules, parse_rule
from sbcrt.watch.sinks import FrameSaver, JsonlSink, parse_save_limits
from sbcrt.watch.sources import (
    PICAMERA2_MISSING,
    OpenCVCapture,
    SourceOptions,
    VideoFileSource,
    WatchedImages,
    parse_source,
)
from sbcrt.watch.stats import LatencyHistogram, WatchStats, format_stats
from sbcrt.watch.types import Event, Frame, Record
from sbcrt.watch.urls import redact_url
from tests.support.watch import SAMPLES, write_video

# -- rules ----------------------------------------------------------------------------------------------------


def test_rule_parsing() -> None:
    rule = parse_rule(" fox , coyote >= 0.6 ")
    assert rule.labels == ("fox", "coyote") and rule.threshold == 0.6 and rule.text == "fox,coyote>=0.6"
    assert parse_rule("water buffalo>=1").labels == ("water buffalo",)
    for bad in ("fox", "fox>0.6", "fox>=", "fox>=abc", "fox>=0", "fox>=1.5", "fox,,cow>=0.5", ">=0.5"):
        with pytest.raises(UsageError):
            parse_rule(bad)


@pytest.fixture(scope="module")
def probe(runtime_models: dict[str, Path]) -> Classifier:
    return Classifier(runtime_models["probe"], threads=1, spin=False, cache_dir=False)


def colour_record(probe: Classifier, rgb: tuple[int, int, int], number: int) -> tuple[list, Record]:
    """A real record: the probe model (scores = channel means) on a flat frame of that colour."""
    frame = np.empty((48, 64, 3), np.uint8)
    frame[:, :] = rgb[::-1]
    result = probe.classify_frame(frame, bgr=True, top_k=3)
    return result.topk, Record(number, f"t{number}", "test", result.topk)


def test_debounce_and_cooldown_on_real_records(probe: Classifier) -> None:
    red, green = (230, 20, 20), (20, 230, 20)
    ranked, _ = colour_record(probe, red, 0)
    assert ranked[0].label == "red" and 0.5 < ranked[0].prob < 0.6  # softmax of channel means
    rules = EventRules([parse_rule("red,blue>=0.5")], debounce=2, cooldown_s=10.0)
    # One frame per second: R G R R R R G R R ... the rule needs 2 reds in a row, then waits 10 s.
    colours = "RGRRRRGRRRRRRRRRRRR"
    fired = []
    for second, colour in enumerate(colours):
        ranked, record = colour_record(probe, red if colour == "R" else green, second)
        for event in rules.update(ranked, record, float(second)):
            assert event.label == "red" and event.prob >= 0.5 and event.rule == "red,blue>=0.5"
            fired.append(event.frame)
    # 3: second red in a row. 13: cool-down over at 13 (>= 3 + 10) with reds still in a row.
    assert fired == [3, 13]


def test_threshold_decides_and_debounce_one_fires_at_once(probe: Classifier) -> None:
    rules = EventRules([parse_rule("red>=0.55")], debounce=1, cooldown_s=0.0)
    ranked, record = colour_record(probe, (230, 20, 20), 0)
    assert 0.5 < ranked[0].prob < 0.55
    assert rules.update(ranked, record, 0.0) == []
    rules = EventRules([parse_rule("red>=0.5")], debounce=1, cooldown_s=0.0)
    assert [e.frame for e in rules.update(ranked, record, 0.0)] == [0]
    assert [e.frame for e in rules.update(ranked, record, 0.0)] == [0]  # no cool-down: every matching frame


def test_rules_rank_enough_classes_and_check_labels() -> None:
    rules = EventRules([parse_rule("fox>=0.6"), parse_rule("cow>=0.05")])
    assert rules.classes_needed() == 20  # a class at 0.05 may be 20th, never 21st
    with pytest.raises(UsageError, match="did you mean 'fox'"):
        EventRules([parse_rule("foxx>=0.5")]).check_labels(["fox", "cow"])
    EventRules([parse_rule("fox>=0.5")]).check_labels(["fox", "cow"])


# -- stats ----------------------------------------------------------------------------------------------------


def test_histogram_percentiles_match_numpy_within_a_bin() -> None:
    values = np.random.default_rng(1).lognormal(3.0, 0.8, 20_000)
    histogram = LatencyHistogram()
    for v in values:
        histogram.add(float(v))
    for q in (50, 90, 99):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert abs(histogram.percentile(q) - exact) / exact < 0.011
    assert len(histogram._bins) < 1000  # bounded by the spread of values, not their number
    assert LatencyHistogram().percentile(50) is None


def test_stats_intervals_and_summary() -> None:
    now = [100.0]
    stats = WatchStats(clock=lambda: now[0])
    for ms in (10.0, 20.0, 30.0, 40.0):
        stats.add(ms, ms + 5)
    now[0] = 102.0
    first = stats.snapshot(frames_read=60, frames_skipped=56)
    assert first["camera_fps"] == 30.0 and first["processed_fps"] == 2.0 and first["skipped_fps"] == 28.0
    assert 19.8 < first["inference_ms"]["p50"] < 20.2 and 39.6 < first["inference_ms"]["p99"] < 40.4
    stats.add(100.0, 105.0)
    now[0] = 104.0
    second = stats.snapshot(frames_read=80, frames_skipped=75)
    assert second["processed_fps"] == 0.5 and second["camera_fps"] == 10.0
    assert 99.0 < second["inference_ms"]["p50"] < 101.0  # only this interval's frame
    final = stats.snapshot(frames_read=80, frames_skipped=75, final=True)
    assert final["frames_processed"] == 5 and final["processed_fps"] == 1.25 and final["uptime_s"] == 4.0
    assert format_stats(final).startswith("summary: 5 frames in 4.0 s | camera 20.0 fps, processed 1.2 fps")
    p50 = float(re.search(r"inference ms p50 ([\d.]+)", format_stats(final))[1])
    assert 29.8 < p50 < 30.2


# -- sinks ----------------------------------------------------------------------------------------------------


def test_save_limits() -> None:
    assert parse_save_limits(["500"]) == (500, None)
    assert parse_save_limits(["2GB"]) == (None, 2_000_000_000)
    assert parse_save_limits(["500,1.5GiB"]) == (500, int(1.5 * 1024**3))
    assert parse_save_limits(["10", "300kb"]) == (10, 300_000)
    for bad in ("0", "-5", "1.5", "5 parsecs", "GB", "0MB"):
        with pytest.raises(UsageError):
            parse_save_limits([bad])


def fired_frame(number: int, wall_time: float, seed: int) -> Frame:
    image = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # noise: ~40 KB JPEG
    return Frame(number, wall_time, 0.0, 0.0, "cam", image=image)


def fire(saver: FrameSaver, frame: Frame) -> None:
    saver.event(Event("fox>=0.5", "red fox", 0.91, frame.number, "t", "cam"), frame)


def test_frame_saver_keeps_the_newest_files_within_limits(tmp_path: Path) -> None:
    folder = tmp_path / "alerts"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file: never counted, never removed")
    saver = FrameSaver(folder, max_files=3)
    for n in range(5):
        fire(saver, fired_frame(n, 1_700_000_000 + n, n))
    saved = sorted(p.name for p in folder.glob("*.jpg"))
    assert [name.split("_")[1] for name in saved] == ["2", "3", "4"]
    assert saved[0].startswith("20231114T221322.000Z_2_red-fox_0.91")
    assert (folder / "notes.txt").exists() and not list(folder.glob(".*"))

    # A new run counts what the previous one saved; the byte limit removes the oldest first.
    one_file = (folder / saved[0]).stat().st_size
    saver = FrameSaver(folder, max_bytes=int(2.5 * one_file))
    fire(saver, fired_frame(5, 1_700_000_010, 5))
    assert sorted(p.name.split("_")[1] for p in folder.glob("*.jpg")) == ["4", "5"]
    # Two rules firing on one frame save it once.
    frame = fired_frame(6, 1_700_000_020, 6)
    fire(saver, frame)
    fire(saver, frame)
    assert sorted(p.name.split("_")[1] for p in folder.glob("*.jpg")) == ["5", "6"]


def test_frame_saver_logs_an_unwritable_folder_and_goes_on(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    saver = FrameSaver(blocker / "alerts", max_files=5)
    with caplog.at_level(logging.ERROR, logger="sbcrt.watch"):
        logging.getLogger("sbcrt.watch").propagate = True
        fire(saver, fired_frame(0, 1_700_000_000, 0))
        fire(saver, fired_frame(1, 1_700_000_001, 1))
    assert sum("cannot save frame" in r.message for r in caplog.records) == 1  # logged once, not per frame
    blocker.unlink()
    fire(saver, fired_frame(2, 1_700_000_002, 2))
    assert [p.name.split("_")[1] for p in (blocker / "alerts").glob("*.jpg")] == ["2"]


def bare_record(number: int) -> Record:
    return Record(number, "t", "cam", [])


def test_jsonl_on_a_full_disk_logs_once_then_recovers(tmp_path: Path, caplog) -> None:
    frame = Frame(0, 0.0, 0.0, 0.0, "cam")
    sink = JsonlSink(Path("/dev/full"), retry_s=0.0)  # every write fails with ENOSPC, like a full SD card
    with caplog.at_level(logging.WARNING, logger="sbcrt.watch"):
        logging.getLogger("sbcrt.watch").propagate = True
        for n in range(5):
            sink.record(bare_record(n), frame)
        errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "No space left on device" in errors[0]
        assert sink._failures.dropped == 5
        sink.path = tmp_path / "deep" / "out.jsonl"  # the disk is writable again (parents are created)
        sink.record(bare_record(5), frame)
        sink.close()
    assert (tmp_path / "deep" / "out.jsonl").read_text() == '{"frame":5,"time":"t","source":"cam","topk":[]}\n'
    assert any("working again" in r.message and "5 dropped" in r.message for r in caplog.records)


def test_jsonl_unwritable_path_is_retried_later(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sink = JsonlSink(blocker / "out.jsonl", retry_s=3600.0)
    frame = Frame(0, 0.0, 0.0, 0.0, "cam")
    sink.record(bare_record(0), frame)
    blocker.unlink()
    sink.record(bare_record(1), frame)  # within the retry interval: not tried again yet
    assert not blocker.exists()
    sink._retry_at = 0.0
    sink.record(bare_record(2), frame)
    sink.close()
    assert (blocker / "out.jsonl").read_text() == '{"frame":2,"time":"t","source":"cam","topk":[]}\n'


# -- sources --------------------------------------------------------------------------------------------------


def test_source_kinds(tmp_path: Path) -> None:
    options = SourceOptions()
    camera = parse_source("0", options)
    assert isinstance(camera, OpenCVCapture) and camera.kind == "camera" and camera.name == "/dev/video0"
    assert parse_source("/dev/video3", options).kind == "camera"
    stream = parse_source("rtsp://admin:hunter2@cam-pen3:554/stream1", options)
    assert stream.kind == "stream" and stream.name == "rtsp://admin:***@cam-pen3:554/stream1"
    assert parse_source("https://cam/mjpeg", options).kind == "stream"
    assert isinstance(parse_source(str(tmp_path), options), WatchedImages)
    assert parse_source(str(tmp_path / "*.jpg"), options).kind == "glob"
    clip = tmp_path / "clip.avi"
    write_video(clip, [np.zeros((48, 64, 3), np.uint8)] * 3, fourcc="MJPG")
    assert isinstance(parse_source(str(clip), SourceOptions(stride=2)), VideoFileSource)


@pytest.mark.parametrize(
    ("argument", "options", "message"),
    [
        ("ftp://cam/x", SourceOptions(), "unsupported stream ftp://"),
        ("no/such/thing.mp4", SourceOptions(), "no such file or folder"),
        (str(SAMPLES / "chelsea.png"), SourceOptions(), "single image"),
        ("0", SourceOptions(stride=2), "--stride: applies to video files; use --fps"),
        (str(SAMPLES), SourceOptions(resolution=(640, 480)), "--resolution: applies to cameras"),
        ("rtsp://cam/1", SourceOptions(new_only=True), "--new-only: applies to folders"),
    ],
)
def test_bad_sources_are_usage_errors(argument: str, options: SourceOptions, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_source(argument, options)
    # A SettingError names the library's setting; the CLI prints it with the flag's name (flag_of).
    text = caught.value.describe(flag_of) if isinstance(caught.value, SettingError) else str(caught.value)
    assert message in text


def test_a_file_opencv_cannot_read_is_a_usage_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(UsageError, match="broken.mp4: OpenCV cannot read it as a video"):
        parse_source(str(broken), SourceOptions())


def test_picamera2_missing_says_how_to_install_it() -> None:
    try:
        import picamera2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("picamera2 is installed here")
    with pytest.raises(UsageError) as caught:
        parse_source("picamera2", SourceOptions())
    assert str(caught.value) == PICAMERA2_MISSING and "apt install python3-picamera2" in PICAMERA2_MISSING


def test_redact_url() -> None:
    assert redact_url("rtsp://user:pw@10.0.0.5/s") == "rtsp://user:***@10.0.0.5/s"
    assert redact_url("rtsp://10.0.0.5/s") == "rtsp://10.0.0.5/s"


# -- the record and the sink interface ----------------------------------------------------------------------


def test_record_json_is_the_documented_line() -> None:
    from sbcrt.runtime.classifier import Prediction
    from sbcrt.watch.types import Timing

    record = Record(7, "2025-05-01T06:12:03.481+02:00", "cam", [Prediction(3, "fox", 0.8125)], ["fox>=0.6"])
    record.timing = Timing(1.23456, 2.0, 3.0004, 0.1, 6.3349)
    assert json.dumps(record.to_json(), separators=(",", ":")) == (
        '{"frame":7,"time":"2025-05-01T06:12:03.481+02:00","source":"cam",'
        '"topk":[{"index":3,"label":"fox","prob":0.8125}],"events":["fox>=0.6"],'
        '"timing_ms":{"capture":1.235,"preprocess":2.0,"inference":3.0,"postprocess":0.1,"total":6.335}}'
    )
    record.events = []
    assert "events" not in record.to_json()  # only on frames where rules fired


def test_the_saver_puts_its_file_on_the_event_whatever_the_sink_order(probe: Classifier, tmp_path: Path) -> None:
    from sbcrt.watch.loop import LoopOptions, WatchLoop
    from sbcrt.watch.sinks import Sink

    video = tmp_path / "red.avi"
    assert write_video(video, [np.full((48, 64, 3), (20, 20, 230), np.uint8)] * 6, fourcc="MJPG")
    seen: list[Path | None] = []

    class Listener(Sink):  # listed before the saver, as a user's own sink might be
        def event(self, event, frame) -> None:
            seen.append(event.snapshot)

    saver = FrameSaver(tmp_path / "alerts")
    rules = EventRules([parse_rule("red>=0.5")], debounce=1, cooldown_s=0.0)
    source = parse_source(str(video), SourceOptions())
    WatchLoop(source, probe, [Listener(), saver], events=rules, options=LoopOptions()).run()
    assert len(seen) == 6 and all(path is not None and path.parent == tmp_path / "alerts" for path in seen)
    assert all(path.is_file() for path in seen)
