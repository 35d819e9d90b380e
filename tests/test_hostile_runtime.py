"""What a careless or hostile user does to the runtime and the export (issue #12): damaged or full graph caches, a
model swapped under the same size and mtime, hostile metadata, unwritable outputs, bad settings. Real models, real
sessions, real tmpfs mounts (skipped, saying why, where mounting is not permitted), real `python -m sbcrt` runs."""

from __future__ import annotations

import os
import queue
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.runtime import session as session_module
from sbcrt.runtime.classifier import Classifier
from sbcrt.runtime.metadata import ModelConfig
from sbcrt.runtime.preprocess import Preprocessing
from tests.conftest import build_onnx

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"
PHOTO = SAMPLES / "chelsea.png"


def sbcrt(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, env=environment, timeout=timeout
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


def cache_notes(clf: Classifier) -> list[str]:
    return [n for n in clf.session_info.notes if "cache" in n or "cached graph" in n]


@pytest.fixture
def tmpfs(tmp_path: Path):
    """mount(name, options) -> a fresh tmpfs folder (e.g. "size=64k", "ro"), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no mount command: the full/read-only filesystem cases need a real tmpfs")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Fill the filesystem under `folder` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    assert os.statvfs(folder).f_bavail == 0


def flip_a_weight(path: Path, value: float) -> None:
    """Overwrite one float in the middle of the model's largest initializer, in place: the protobuf stays valid
    and the size is unchanged, as bit rot would leave it."""
    data = bytearray(path.read_bytes())
    model = onnx.load(str(path))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    start = data.find(raw)
    assert start >= 0 and len(raw) >= 8
    middle = start + (len(raw) // 8) * 4
    data[middle : middle + 4] = struct.pack("<f", value)
    with open(path, "r+b") as fh:  # the same file (inode), as damage on the card would be
        fh.write(data)


def entry_of(clf: Classifier) -> Path:
    entry = clf.session_info.cache_path
    assert entry is not None and entry.is_file()
    return entry


# -- D1: a damaged cached graph is never trusted -----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), 3.0])
def test_bit_rot_in_a_cached_graph_is_caught_and_rebuilt(
    runtime_models: dict[str, Path], tmp_path: Path, value: float
) -> None:
    model = runtime_models["tiny"]
    reference = Classifier(model, cache_dir=False).classify(PHOTO).logits
    entry = entry_of(Classifier(model, cache_dir=tmp_path))
    flip_a_weight(entry, value)  # NaN: the "tench nan" report; 3.0: a silently different answer

    clf = Classifier(model, cache_dir=tmp_path)
    assert not clf.session_info.cache_hit
    notes = cache_notes(clf)
    assert len(notes) == 1 and "damaged" in notes[0], clf.session_info.notes
    assert np.allclose(clf.classify(PHOTO).logits, reference, atol=1e-5)
    # The damaged entry is gone and a good one took its place.
    again = Classifier(model, cache_dir=tmp_path)
    assert again.session_info.cache_hit and not cache_notes(again)
    assert np.allclose(again.classify(PHOTO).logits, reference, atol=1e-5)


def test_bit_rot_in_the_cached_lite0_graph_never_gives_a_wrong_answer(lite0_onnx: Path, tmp_path: Path) -> None:
    reference = Classifier(lite0_onnx, cache_dir=False).classify(PHOTO)
    flip_a_weight(entry_of(Classifier(lite0_onnx, cache_dir=tmp_path)), float("nan"))
    clf = Classifier(lite0_onnx, cache_dir=tmp_path)
    result = clf.classify(PHOTO)
    assert not clf.session_info.cache_hit and len(cache_notes(clf)) == 1
    assert np.isfinite(result.logits).all() and result.top1 == reference.top1


def test_a_cache_entry_that_is_a_device_is_not_read(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    model = runtime_models["tiny"]
    entry = entry_of(Classifier(model, cache_dir=tmp_path))
    entry.unlink()
    entry.symlink_to("/dev/zero")  # reading it would never end
    clf = Classifier(model, cache_dir=tmp_path)
    assert not clf.session_info.cache_hit
    # Rebuilt: the new entry replaced the link (a rename), the device is untouched.
    assert entry.is_file() and not entry.is_symlink() and stat.S_ISCHR(os.stat("/dev/zero").st_mode)


# -- D2: a cache that cannot be written only costs speed ------------------------------------------------------


def test_a_full_cache_filesystem_only_costs_speed(runtime_models: dict[str, Path], tmpfs) -> None:
    cache = tmpfs("full-cache", "size=64k")
    fill(cache)
    clf = Classifier(runtime_models["tiny"], cache_dir=cache)
    notes = cache_notes(clf)
    assert len(notes) == 1 and "not saved" in notes[0], clf.session_info.notes
    assert clf.session_info.cache_path is None and not clf.session_info.cache_hit
    assert sorted(p.name for p in cache.iterdir()) == ["filler"]  # no .partial left behind

    done = sbcrt("classify", "-m", str(runtime_models["tiny"]), str(PHOTO), env={"SBCRT_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("note: graph cache") == 1, done.stderr


def test_a_cache_too_small_for_lite0_only_costs_speed(lite0_onnx: Path, tmpfs) -> None:
    cache = tmpfs("tiny-cache", "size=64k")
    done = sbcrt("classify", "-m", str(lite0_onnx), str(PHOTO), env={"SBCRT_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert "tabby" in done.stdout or "tiger cat" in done.stdout
    assert done.stderr.count("note: graph cache") == 1 and not list(cache.iterdir())


@pytest.mark.parametrize("where", ["/dev/full", "a-file"])
def test_a_cache_path_that_is_not_a_folder_only_costs_speed(
    runtime_models: dict[str, Path], tmp_path: Path, where: str
) -> None:
    cache = Path(where) if where.startswith("/") else tmp_path / where
    if not cache.exists():
        cache.write_text("a file, not a folder")
    clf = Classifier(runtime_models["tiny"], cache_dir=cache)
    assert len(cache_notes(clf)) == 1 and clf.session_info.cache_path is None


def test_a_read_only_cache_still_serves_its_entries(runtime_models: dict[str, Path], tmpfs) -> None:
    cache = tmpfs("ro-cache", "size=1m")
    Classifier(runtime_models["tiny"], cache_dir=cache)
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    clf = Classifier(runtime_models["tiny"], cache_dir=cache)
    assert clf.session_info.cache_hit and not cache_notes(clf)


# -- D3: the key is the model's content --------------------------------------------------------------------------


def test_a_model_replaced_under_the_same_size_and_mtime_is_not_served_the_old_graph(
    runtime_models: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(runtime_models["tiny"].read_bytes())
    cache = tmp_path / "cache"
    old = Classifier(model, cache_dir=cache).classify(PHOTO).logits
    before = model.stat()

    # A new version of the same size, written over the same file, its mtime put back (`cp -p`, `tar x`).
    flip_a_weight(model, 7.5)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = model.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)

    expected = Classifier(model, cache_dir=False).classify(PHOTO).logits
    assert not np.allclose(expected, old, atol=1e-3)  # the change matters
    clf = Classifier(model, cache_dir=cache)
    assert not clf.session_info.cache_hit
    assert np.allclose(clf.classify(PHOTO).logits, expected, atol=1e-5)


def test_the_same_bytes_at_another_path_share_one_entry(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "tiny.onnx"
    copy.parent.mkdir()
    copy.write_bytes(runtime_models["tiny"].read_bytes())
    first = Classifier(runtime_models["tiny"], cache_dir=tmp_path / "cache")
    second = Classifier(copy, cache_dir=tmp_path / "cache")
    assert second.session_info.cache_hit and second.session_info.cache_path == first.session_info.cache_path


# -- eviction and leftovers --------------------------------------------------------------------------------------


def test_the_cache_evicts_old_versions_stale_entries_and_leftovers(
    runtime_models: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    day = 86400
    now = time.time()

    def put(name: str, age_s: float) -> Path:
        path = cache / name
        path.write_bytes(b"x")
        os.utime(path, (now - age_s, now - age_s))
        return path

    older_versions = [put(f"tiny-{i:020x}-{i:08x}.opt.onnx", (i + 1) * 60) for i in range(3)]
    other_recent = put(f"other-{9:020x}-{9:08x}.opt.onnx", 60)
    other_stale = put(f"other-{8:020x}-{8:08x}.opt.onnx", (session_module.MAX_AGE_DAYS + 1) * day)
    legacy = put(f"tiny-{'ab' * 10}.onnx", 10)  # an earlier sbcrt's unverified entry
    crashed = put(f".tiny-{'cd' * 10}-k3j2h1.partial", 2 * 3600)
    in_progress = put(f".other-{'ef' * 10}-0a1b2c3d4e5f.partial", 5)
    unrelated = put("my-notes.txt", 400 * day)

    clf = Classifier(runtime_models["tiny"], cache_dir=cache)
    left = {p.name for p in cache.iterdir()}
    new = entry_of(clf)
    # Per model name: the new entry and the most recently used older one (KEEP_PER_MODEL = 2).
    assert session_module.KEEP_PER_MODEL == 2
    assert new.name in left and older_versions[0].name in left
    assert not {p.name for p in older_versions[1:]} & left
    assert other_recent.name in left and other_stale.name not in left
    assert legacy.name not in left and crashed.name not in left
    assert in_progress.name in left and unrelated.name in left


def test_a_cache_hit_marks_its_entry_used(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    entry = entry_of(Classifier(runtime_models["tiny"], cache_dir=tmp_path))
    long_ago = time.time() - 10 * 86400
    os.utime(entry, (long_ago, long_ago))
    assert Classifier(runtime_models["tiny"], cache_dir=tmp_path).session_info.cache_hit
    assert entry.stat().st_mtime > long_ago + 86400


# -- D4: files are written with the user's umask -----------------------------------------------------------------


def test_the_exported_model_and_cache_entries_follow_the_umask(lite0_onnx: Path, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(lite0_onnx.stat().st_mode) == expected  # written by `sbcrt export` in conftest
    entry = entry_of(Classifier(lite0_onnx, cache_dir=tmp_path))
    assert stat.S_IMODE(entry.stat().st_mode) == expected


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from sbcrt.export.pipeline import _write_atomically

    previous = os.umask(umask)
    try:
        _write_atomically(tmp_path / "out" / "m.onnx", b"payload")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "m.onnx").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.onnx"]


# -- D5: hostile metadata values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("mean", '"abc"'),
        ("crop_size", "null"),
        ("mean", "[NaN, 0.4, 0.4]"),
        ("std", "[0.2, 0.0, 0.2]"),
        ("resize_size", "true"),
        ("labels", '"cat"'),
        ("input_size", "[3, 224]"),
        ("num_classes", "-4"),
        ("interpolation", "7"),
    ],
)
def test_hostile_metadata_is_refused_naming_the_key(
    runtime_models: dict[str, Path], tmp_path: Path, key: str, raw: str
) -> None:
    model = onnx.load(str(runtime_models["tiny"]))
    entry = next(p for p in model.metadata_props if p.key == key)
    entry.value = raw
    path = tmp_path / "hostile.onnx"
    onnx.save(model, str(path))
    done = sbcrt("classify", "-m", str(path), str(PHOTO), env={"SBCRT_CACHE": "off"})
    assert done.returncode == 2
    assert f"metadata {key!r}" in one_line_error(done)


def test_valid_metadata_of_every_kind_still_loads() -> None:
    config = ModelConfig(architecture="x", labels=["a"], num_classes=1, untrained=True, precision="int8")
    assert ModelConfig.from_props(config.to_props()) == config


# -- D13: export to a place it cannot write ----------------------------------------------------------------------


def test_export_to_a_read_only_place_fails_first_in_one_line(tmpfs) -> None:
    read_only = tmpfs("ro-out", "ro,size=64k")
    started = time.perf_counter()
    done = sbcrt("export", "efficientnet_lite0", "--random-init", "-o", str(read_only / "sub" / "m.onnx"))
    assert done.returncode == 2
    line = one_line_error(done)
    assert "cannot write in" in line and "Read-only" in line
    # Checked before torch is imported, let alone the model built (that takes tens of seconds here).
    assert time.perf_counter() - started < 30


def test_export_onto_a_special_file_is_refused(tmp_path: Path) -> None:
    # A FIFO of our own, not /dev/full: run as root, an export that renamed its file over a device node would
    # replace the machine's device.
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    done = sbcrt("export", "efficientnet_lite0", "--random-init", "-o", str(fifo))
    assert done.returncode == 2 and "not a regular file" in one_line_error(done)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # untouched


def test_an_export_removes_temporary_files_of_killed_exports(tmp_path: Path) -> None:
    from sbcrt.export.pipeline import _write_atomically

    old = time.time() - 2 * 3600
    killed = tmp_path / ".m.onnx.k2j_4hq9.tmp"  # a mkstemp name from an export killed while writing
    running = tmp_path / ".m.onnx.0a1b2c3d4e5f.tmp"  # a concurrent export, still writing
    other = tmp_path / ".other.onnx.k2j_4hq9.tmp"
    for path in (killed, running, other):
        path.write_bytes(b"x")
    for path in (killed, other):
        os.utime(path, (old, old))
    _write_atomically(tmp_path / "m.onnx", b"payload")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "m.onnx"])


def test_a_write_that_fails_late_is_one_line_and_leaves_nothing(tmpfs) -> None:
    from sbcrt.export.pipeline import _write_atomically

    full = tmpfs("late-full", "size=64k")
    with pytest.raises(SbcrtError, match="needs 0.1 MB") as caught:
        _write_atomically(full / "m.onnx", b"\1" * 100_000)
    assert "\n" not in str(caught.value) and "nothing was written" in str(caught.value)
    assert not list(full.iterdir())


def test_export_of_a_file_that_is_not_a_checkpoint_says_so(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    for checkpoint in ("/etc/passwd", str(PHOTO)):
        done = sbcrt("export", "efficientnet_lite0", "--checkpoint", checkpoint, "-o", str(out))
        assert done.returncode == 1
        line = one_line_error(done)
        assert "not a PyTorch checkpoint" in line and "IndexError" not in line
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04" + os.urandom(64))  # starts like a zip, is not one
    done = sbcrt("export", "efficientnet_lite0", "--checkpoint", str(broken), "-o", str(out))
    assert done.returncode == 1 and "damaged or not a PyTorch checkpoint" in one_line_error(done)
    assert not out.exists()


# -- rough edges -------------------------------------------------------------------------------------------------


def test_a_bad_max_pixels_fails_once_before_any_image(runtime_models: dict[str, Path]) -> None:
    for raw in ("abc", "0", "-5"):
        done = sbcrt(
            "classify", "-m", str(runtime_models["tiny"]), str(PHOTO), str(PHOTO), env={"SBCRT_MAX_PIXELS": raw}
        )
        assert done.returncode == 2 and "SBCRT_MAX_PIXELS" in one_line_error(done)
        assert done.stdout == ""


def test_max_pixels_can_go_above_pils_own_limit(runtime_models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    # A PNG header declaring 20000 x 10000 (200 MP, above PIL's 179 MP refusal) with no pixels behind it.
    path = tmp_path / "huge.png"
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 10000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test

    clf = Classifier(runtime_models["probe"], cache_dir=False)
    with pytest.raises(SbcrtError, match="refused"):
        clf.classify(path)
    monkeypatch.setenv("SBCRT_MAX_PIXELS", "400000000")
    allowed = Classifier(runtime_models["probe"], cache_dir=False)
    with pytest.raises(SbcrtError) as caught:
        allowed.classify(path)
    assert "refused" not in str(caught.value)  # opened and decoded: it is only its missing pixels that fail
    assert "truncated" in str(caught.value) or "corrupt" in str(caught.value)


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ((float("nan"), 0.4, 0.4), (0.2, 0.2, 0.2)),
        ((0.4, 0.4, 0.4), (0.2, float("inf"), 0.2)),
        ((0.4, float("-inf"), 0.4), (0.2, 0.2, 0.2)),
        ((0.4, 0.4, 0.4), (0.2, float("nan"), 0.2)),
    ],
)
def test_nan_and_inf_mean_or_std_are_refused(mean: tuple, std: tuple) -> None:
    with pytest.raises(UsageError, match="finite"):
        Preprocessing(mean=mean, std=std)


def test_classify_refuses_a_nan_mean(runtime_models: dict[str, Path]) -> None:
    done = sbcrt("classify", "-m", str(runtime_models["bare"]), "--mean", "nan", "0.4", "0.4", str(PHOTO))
    assert done.returncode == 2 and "finite" in one_line_error(done)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("untrained") / "random.onnx"
    return build_onnx(path, "conv", config={"architecture": "tiny", "labels": list("abcd"), "untrained": True})


def test_classify_warns_about_an_untrained_model_even_when_quiet(untrained_model: Path) -> None:
    done = sbcrt("classify", "-q", "-m", str(untrained_model), str(PHOTO))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning:") == 1 and "UNTRAINED" in done.stderr


def test_watch_warns_about_an_untrained_model(untrained_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sbcrt", "watch", "-q", "-m", str(untrained_model), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        line = lines.get(timeout=120)  # -q: the warning is the only line before any error
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert "WARNING" in line and "UNTRAINED" in line


def test_classifier_exposes_the_untrained_flag(untrained_model: Path, runtime_models: dict[str, Path]) -> None:
    assert Classifier(untrained_model, cache_dir=False).warnings
    assert not Classifier(runtime_models["tiny"], cache_dir=False).warnings
