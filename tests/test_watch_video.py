"""`sbcrt watch` on video files as a user runs it: every frame in order, subsampling, real photos through Lite0,
events with saved frames, usage errors, and a clean stop on SIGINT mid-video."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from sbcrt import cli
from tests.support.watch import (
    RED_PERIOD,
    WatchProcess,
    build_slow_probe,
    decode_number,
    numbered_frame,
    photo_frames,
    read_jsonl,
    write_video,
)

RECORD_KEYS = ["frame", "time", "source", "topk", "timing_ms"]
STAGES = ["capture", "preprocess", "inference", "postprocess", "total"]


@pytest.fixture(scope="module")
def numbered_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 frames at 10 fps whose colour encodes their number, as MJPG AVI and (if this build writes it) MP4."""
    root = tmp_path_factory.mktemp("clips")
    frames = [numbered_frame(n) for n in range(40)]
    clips = {}
    for fourcc, name in (("MJPG", "clip.avi"), ("mp4v", "clip.mp4")):
        if write_video(root / name, frames, fourcc=fourcc):
            clips[fourcc] = root / name
    assert "MJPG" in clips
    return clips


def watch(*args: str) -> int:
    return cli.main(["watch", *[str(a) for a in args]])


def test_heartbeat_file_shows_a_working_loop(numbered_clips, runtime_models, tmp_path: Path) -> None:
    # The arm64 image's HEALTHCHECK reads this file's age; a run that processed frames must have written it.
    heartbeat = tmp_path / "state" / "heartbeat"
    heartbeat.parent.mkdir()
    out = tmp_path / "out.jsonl"
    args = [numbered_clips["MJPG"], "--model", runtime_models["probe"], "--jsonl", out, "-q"]
    assert watch(*args) == 0 and not heartbeat.exists()  # off unless asked for
    assert watch(*args, "--heartbeat", heartbeat) == 0
    assert heartbeat.is_file() and len(read_jsonl(out)) == 80


@pytest.mark.parametrize("fourcc", ["MJPG", "mp4v"])
def test_every_frame_in_order(fourcc: str, numbered_clips, runtime_models, tmp_path: Path) -> None:
    if fourcc not in numbered_clips:
        pytest.skip(f"this OpenCV build cannot write {fourcc}")
    out = tmp_path / "out.jsonl"
    assert watch(numbered_clips[fourcc], "--model", runtime_models["probe"], "-k", "3", "--jsonl", out, "-q") == 0
    records = read_jsonl(out)
    assert [r["frame"] for r in records] == list(range(40))
    # The pixels the model saw are those of that frame (read back through the probe model).
    assert [decode_number(r["topk"]) for r in records] == [n % RED_PERIOD for n in range(40)]
    first = records[0]
    assert list(first) == RECORD_KEYS and list(first["timing_ms"]) == STAGES
    assert first["source"] == str(numbered_clips[fourcc])
    assert [set(p) for p in first["topk"]] == [{"index", "label", "prob"}] * 3
    assert "T" in first["time"] and first["time"][-6] in "+-"  # ISO-8601 with the UTC offset
    for record in records:
        t = record["timing_ms"]
        assert t["capture"] > 0 and t["inference"] > 0
        assert t["total"] >= t["capture"] + t["preprocess"] + t["inference"] + t["postprocess"] - 0.01


@pytest.mark.parametrize(
    ("flags", "expected"), [(["--stride", "4"], range(0, 40, 4)), (["--fps", "2.5"], range(0, 40, 4))]
)
def test_subsampling(flags: list[str], expected: range, numbered_clips, runtime_models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    assert watch(numbered_clips["MJPG"], "--model", runtime_models["probe"], "-k", "3", "--jsonl", out, *flags) == 0
    records = read_jsonl(out)
    assert [r["frame"] for r in records] == list(expected)
    assert [decode_number(r["topk"]) for r in records] == [n % RED_PERIOD for n in expected]
    summary = [line for line in capsys.readouterr().err.splitlines() if "summary:" in line]
    assert len(summary) == 1 and "summary: 10 frames in" in summary[0]


def test_real_photos_through_lite0(imagenet_samples, lite0_onnx: Path, tmp_path: Path) -> None:
    chosen = imagenet_samples[::25][:10]
    clip = tmp_path / "photos.avi"
    assert write_video(clip, photo_frames([p for p, _ in chosen], (320, 320)), fourcc="MJPG", fps=5)
    out = tmp_path / "out.jsonl"
    assert watch(clip, "--model", lite0_onnx, "--jsonl", out, "-q") == 0
    records = read_jsonl(out)
    assert [r["frame"] for r in records] == list(range(len(chosen)))
    correct = sum(r["topk"][0]["index"] == truth for r, (_, truth) in zip(records, chosen, strict=True))
    assert correct >= 6, [r["topk"][0]["label"] for r in records]  # Lite0 is ~75 % top-1 on ImageNet


def test_events_fire_and_save_frames(runtime_models, tmp_path: Path, capsys) -> None:
    # 2 s of green, 2 s of red, 2 s of green, 2 s of red at 10 fps.
    frames = []
    for second in range(8):
        colour = (20, 20, 230) if second % 4 in (2, 3) else (20, 230, 20)  # BGR
        frames += [np.full((48, 64, 3), colour, np.uint8)] * 10
    clip = tmp_path / "pen.avi"
    assert write_video(clip, frames, fourcc="MJPG")
    out, alerts = tmp_path / "out.jsonl", tmp_path / "alerts"
    rule = "red>=0.5"
    status = watch(clip, "--model", runtime_models["probe"], "--jsonl", out, "--when", rule, "--debounce", "3",
                   "--cooldown", "3", "--save", alerts, "--save-max", "1")  # fmt: skip
    assert status == 0
    records = read_jsonl(out)
    fired = [r["frame"] for r in records if r.get("events") == [rule]]
    # Red from frame 20 and 60: third red frame in a row fires; cool-down is video time (3 s = 30 frames),
    # so the second red run (40 frames after the first event) fires again.
    assert fired == [22, 62]
    saved = sorted(p.name for p in alerts.iterdir())
    assert len(saved) == 1 and "_62_red_" in saved[0]  # --save-max 1 kept the newest
    assert "event red>=0.5: red" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no model: pass --model"),
        (["--model", "{probe}", "--when", "red>0.5"], 'expected "label[,label...]>=probability"'),
        (["--model", "{probe}", "--save", "alerts"], "--save keeps the frames that fire an event"),
        (["--model", "{probe}", "--when", "fox>=0.5"], "the model has no class 'fox'"),
        (["--model", "{probe}", "--fps", "2", "--stride", "2"], "--fps and --stride both subsample"),
        (["--model", "{probe}", "--when", "red>=0.5", "--save", "a", "--save-max", "2 parsecs"], "--save-max"),
        (["--model", "no-such-model.onnx"], "no such file"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message, numbered_clips, runtime_models, capsys) -> None:
    args = [a.replace("{probe}", str(runtime_models["probe"])) for a in args]
    assert watch(numbered_clips["MJPG"], *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sbcrt watch: error: ") and message in err and err.count("\n") == 1, err


def test_bad_flag_values_exit_2(numbered_clips, capsys) -> None:
    for flags in (["--fps", "0"], ["--resolution", "big"], ["--settle", "-1"], ["--debounce", "0"]):
        with pytest.raises(SystemExit) as caught:
            watch(numbered_clips["MJPG"], *flags)
        assert caught.value.code == 2
        assert "error: argument" in capsys.readouterr().err


def test_sigint_mid_video_finishes_the_frame_and_exits_0(tmp_path: Path) -> None:
    clip = tmp_path / "long.avi"
    assert write_video(clip, [numbered_frame(n) for n in range(300)], fourcc="MJPG")
    model = build_slow_probe(tmp_path / "slow.onnx", matmuls=24)
    out = tmp_path / "out.jsonl"
    watcher = WatchProcess(str(clip), "--model", str(model), "--threads", "1", "-k", "3", "--jsonl", str(out))
    try:
        watcher.wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, 60, "three records")
        assert watcher.signal(signal.SIGINT) == 0
    finally:
        watcher.kill()
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line complete
    assert 3 <= len(records) < 300
    assert [r["frame"] for r in records] == list(range(len(records)))
    err = "\n".join(watcher.stderr_lines)
    assert "SIGINT: finishing the current frame" in err and f"summary: {len(records)} frames" in err
    assert "Traceback" not in err
