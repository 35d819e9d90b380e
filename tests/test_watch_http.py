"""`sbcrt watch --http`: the page in a real browser (Debian's headless chromium) against a running watch on a video
of real photos through EfficientNet-Lite0, /metrics scraped by a real Prometheus server, the JSON API against the
JSONL records, the token, and requests that try to break out or tie the server up: path traversal, symlinks,
huge and malformed requests, clients that stop reading or never finish, more clients than slots."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from sbcrt.commands.arguments import flag_of
from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.classifier import Classifier, Prediction
from sbcrt.watch.http import PAGE_WIDTH, HttpSettings, HttpSink, check_exposure, parse_address
from sbcrt.watch.loop import LoopOptions, WatchLoop
from sbcrt.watch.sources import SourceOptions, parse_source
from sbcrt.watch.types import Frame, Record, Timing
from tests.support.watch import (
    RED_PERIOD,
    REPO,
    MjpegServer,
    WatchProcess,
    jpeg,
    numbered_frame,
    photo_frames,
    read_jsonl,
    write_video,
)

pytest.importorskip("prometheus_client", reason='prometheus-client is not installed (pip install "sbcrt[http]")')

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TOKEN = "s3cret-pen3-token"
SCREENSHOT = REPO / "build" / "watch_http.png"
SERVING = re.compile(r"http: serving http://127\.0\.0\.1:(\d+)/")


def require(binary: str, paths: tuple[str, ...], package: str) -> str:
    """A tool the test drives; skipped where it is not installed, except in CI, where it must be (.ci/run)."""
    found = shutil.which(binary) or next((p for p in paths if os.access(p, os.X_OK)), None)
    if found is None:
        message = f"{binary} is not installed (Debian: apt-get install -y --no-install-recommends {package})"
        if CI:
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return found


def serving_port(proc: WatchProcess) -> int:
    proc.wait_for(lambda: any(SERVING.search(line) for line in proc.stderr_lines), 120, "the http server to start")
    return int(next(SERVING.search(line)[1] for line in proc.stderr_lines if SERVING.search(line)))


def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 10):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; read what comes back until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may close on us mid-send (a huge request): what it answered still counts.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def status_of(response: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    return int(match[1]) if match else None


class Dom(HTMLParser):
    """Elements with an id from chromium's --dump-dom: their attributes and text; plus every <img> and <tr>."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.images: list[dict[str, str]] = []
        self.event_rows: list[list[str]] = []
        self._open: list[tuple[str, dict | None]] = []
        self._row: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(attributes)
        if tag == "tr" and "event" in attributes.get("class", ""):
            self._row = []
        if tag == "td" and self._row is not None:
            self._row.append("")
        element = None
        if "id" in attributes:
            element = self.by_id[attributes["id"]] = {"tag": tag, "attrs": attributes, "text": ""}
        if tag not in ("img", "br", "meta", "input"):
            self._open.append((tag, element))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.event_rows.append(self._row)
            self._row = None
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            if element is not None:
                element["text"] += data
        if self._row:
            self._row[-1] += data

    def text(self, element_id: str) -> str:
        return self.by_id[element_id]["text"].strip()

    def attr(self, element_id: str, name: str) -> str:
        return self.by_id[element_id]["attrs"].get(name, "")


def chromium(binary: str, url: str, *mode: str, budget_ms: int = 6000) -> subprocess.CompletedProcess:
    """Headless chromium, offline and without a profile of its own; `mode` is --dump-dom or --screenshot=..."""
    with tempfile.TemporaryDirectory(prefix="sbcrt-chromium-") as profile:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1200",
             "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *mode, url],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


# -- flags ----------------------------------------------------------------------------------------------------------


def test_address_and_exposure_rules() -> None:
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert parse_address("pi.local:80") == ("pi.local", 80)
    for bad in ("", "http", ":8080", "1.2.3.4:99999", "[::1]8080", "::1:8080", "host:-1"):
        with pytest.raises(SettingError) as caught:
            parse_address(bad)
        assert caught.value.setting == "http.address"
        assert caught.value.describe(flag_of).startswith(f"--http {bad.strip()!r}: ")
    assert check_exposure(HttpSettings(host="127.0.0.1")) is None
    assert check_exposure(HttpSettings(host="::1")) is None
    assert check_exposure(HttpSettings(host="localhost")) is None
    assert check_exposure(HttpSettings(host="0.0.0.0", token=TOKEN)) is None
    for open_host in ("0.0.0.0", "192.168.1.20", "::", "pi.local"):
        with pytest.raises(SettingError) as caught:
            check_exposure(HttpSettings(host=open_host))
        # The library names its own settings; the CLI's message names the flags a user types.
        assert "set http.token" in str(caught.value) and "--" not in str(caught.value)
        assert "set --http-token (or $SBCRT_HTTP_TOKEN), or say --http-insecure" in caught.value.describe(flag_of)
        warning = check_exposure(HttpSettings(host=open_host, insecure=True))
        assert "WITHOUT a token" in warning
    with pytest.raises(UsageError, match="empty"):
        check_exposure(HttpSettings(host="0.0.0.0", token=" "))


def test_cli_refuses_what_it_should(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    model = str(runtime_models["tiny"])

    def watch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k not in ("SBCRT_MODEL", "SBCRT_HTTP_TOKEN")}
        return subprocess.run([sys.executable, "-m", "sbcrt", "watch", str(folder), "--model", model, *args],
                              capture_output=True, text=True, timeout=60, env=environment | (env or {}))  # fmt: skip

    for args, message in (
        (["--http", "0.0.0.0:0"], "listens beyond this machine"),
        (["--http", "nonsense"], "the port must be a number"),
        (["--http-token", TOKEN], "need --http"),
        (["--http", "127.0.0.1:0", "--http-token", ""], "the token is empty"),
    ):
        done = watch(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # The port is taken: one line, before any frame.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = watch("--http", f"127.0.0.1:{taken.getsockname()[1]}")
    assert done.returncode == 2 and "cannot listen" in done.stderr and "Traceback" not in done.stderr
    # ... and before the model loads: a broken model file is not even read (a model load costs seconds on a Pi).
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = watch("--http", f"127.0.0.1:{port}", "--model", str(broken))
    assert done.returncode == 2 and done.stderr.startswith(
        f"sbcrt watch: error: --http '127.0.0.1:{port}': cannot listen"
    )
    assert "ONNX" not in done.stderr
    # Without prometheus-client installed (its import fails), --http says what to install.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    done = watch("--http", "127.0.0.1:0", env={"PYTHONPATH": f"{blocked}{os.pathsep}{REPO}"})
    assert done.returncode == 2 and 'pip install "sbcrt[http]"' in done.stderr, done.stderr


# -- the page in a browser ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_clip(tmp_path_factory: pytest.TempPathFactory, imagenet_samples, lite0_onnx: Path):
    """A video of real photos, each held for HOLD frames (a scene that changes now and then), with a rule that
    fires on the first photo: the photo Lite0 is surest of, by a margin."""
    classifier = Classifier(lite0_onnx, warmup=False, cache_dir=False)
    photos = [path for path, _ in imagenet_samples[::8][:16]]
    scored = []
    for photo in photos:
        top = classifier.classify(photo, top_k=1).topk[0]
        if re.fullmatch(r"[A-Za-z' -]+", top.label):  # usable in a --when rule as it is
            scored.append((top.prob, photo, top.label))
    prob, first, label = max(scored)
    assert prob >= 0.4, scored
    order = [first] + [p for p in photos if p != first]
    hold = 90
    frames = [frame for frame in photo_frames(order, (480, 360)) for _ in range(hold)]
    root = tmp_path_factory.mktemp("photo-clip")
    for fourcc, name in (("mp4v", "farm.mp4"), ("MJPG", "farm.avi")):
        if write_video(root / name, frames, fourcc=fourcc, fps=10):
            return root / name, f"{label}>={round(prob * 0.8, 2)}", label
    pytest.skip("this OpenCV build writes neither mp4v nor MJPG")


def test_page_in_a_browser(photo_clip, lite0_onnx: Path, tmp_path: Path) -> None:
    browser = require("chromium", ("/usr/bin/chromium", "/usr/bin/chromium-browser"), "chromium")
    clip, rule, rule_label = photo_clip
    saved, out = tmp_path / "saved", tmp_path / "out.jsonl"
    proc = WatchProcess(str(clip), "--model", str(lite0_onnx), "--threads", "1", "--jsonl", str(out),
                        "--http", "127.0.0.1:0", "--stats-interval", "1", "--when", rule, "--save", str(saved),
                        "--no-cache")  # fmt: skip
    try:
        port = serving_port(proc)
        proc.wait_for(lambda: proc.count("stats:") >= 2 and proc.count(" saved ") >= 1, 180, "statistics and an event")
        dumped = chromium(browser, f"http://127.0.0.1:{port}/", "--dump-dom")
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        dom = Dom(dumped.stdout)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.unlink(missing_ok=True)
        shot = chromium(browser, f"http://127.0.0.1:{port}/", f"--screenshot={SCREENSHOT}")
        assert shot.returncode == 0 and SCREENSHOT.is_file(), shot.stderr[-2000:]
        assert proc.proc.poll() is None, "the video ended before the browser was done: the page saw no live run"
        records = {r["frame"]: r for r in read_jsonl(out)}
    finally:
        code = proc.signal(signal.SIGTERM)
    assert code == 0, "\n".join(proc.stderr_lines)

    # The latest frame: the label and probability the page shows are the record's for the frame it shows.
    frame = int(dom.text("frame-no"))
    assert dom.attr("latest", "data-frame") == str(frame)
    record = records[frame]
    assert dom.text("latest-label") == record["topk"][0]["label"]
    assert dom.text("latest-prob") == f"{100 * record['topk'][0]['prob']:.1f}%"
    assert dom.text("source") == str(clip)
    assert f"/snapshot.jpg?f={frame}" in next(i["src"] for i in dom.images if i.get("id") == "frame-img")
    assert "inference" in dom.text("timing") and "total" in dom.text("timing")

    # The chart was drawn: series for the top classes, with points, named after the model's classes.
    assert int(dom.attr("chart", "data-series")) >= 2
    assert int(dom.attr("chart", "data-points")) >= int(dom.attr("chart", "data-series")) * 2
    charted = dom.attr("chart", "data-labels").split("|")
    assert rule_label in charted
    assert set(charted) <= {p["label"] for r in records.values() for p in r["topk"]}

    # The statistics were filled with the run's numbers.
    for element in ("stat-camera-fps", "stat-processed-fps", "stat-inf-p50", "stat-inf-p90", "stat-inf-p99",
                    "stat-total-p50"):  # fmt: skip
        assert float(dom.text(element)) > 0, (element, dom.text(element))
    assert float(dom.text("stat-skipped-fps")) >= 0
    assert int(dom.text("stat-frames")) > 0 and dom.text("stat-errors") == "0" and dom.text("stat-reconnects") == "0"
    assert dom.text("stat-mqtt") == "off"
    assert dom.text("health") == "processing"

    # The model's metadata and the event with its saved snapshot.
    assert dom.attr("model", "data-architecture") == "efficientnet_lite0"
    assert "efficientnet_lite0" in dom.text("model") and "fp32" in dom.text("model") and rule in dom.text("model")
    assert dom.event_rows and dom.event_rows[0][1] == rule and dom.event_rows[0][2] == rule_label
    snapshots = [i["src"] for i in dom.images if i.get("class") == "snapshot"]
    files = {p.name for p in saved.iterdir()}
    assert snapshots and all(src.split("/snapshots/")[1] in files for src in snapshots), (snapshots, files)

    width, height = png_size(SCREENSHOT)
    assert (width, height) == (1280, 1200) and SCREENSHOT.stat().st_size > 50_000


# -- Prometheus -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prometheus_scrapes_the_metrics(runtime_models: dict[str, Path], imagenet_samples, tmp_path: Path) -> None:
    binary = require("prometheus", ("/usr/bin/prometheus",), "prometheus")
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = [path for path, _ in imagenet_samples[:7]]
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    out = tmp_path / "out.jsonl"
    proc = WatchProcess(str(folder), "--model", str(runtime_models["tiny"]), "--jsonl", str(out), "--settle", "0",
                        "--http", "127.0.0.1:0", "--http-token", TOKEN, "--stats-interval", "1",
                        "--when", "dog>=0.3", "--debounce", "1")  # fmt: skip
    prometheus = None
    try:
        port = serving_port(proc)
        proc.wait_for(lambda: out.exists() and len(read_jsonl(out)) == len(photos), 60, "every photo classified")
        events = sum("events" in r for r in read_jsonl(out))
        api = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: sbcrt\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 1s\n"
            f"    authorization: {{type: Bearer, credentials: {TOKEN}}}\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
        )
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{api}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        def query(expression: str) -> list[dict]:
            status, _, body = get(api, "/api/v1/query?query=" + expression.replace(" ", "%20"), timeout=5)
            assert status == 200, body
            return json.loads(body)["data"]["result"]

        deadline = time.monotonic() + 90
        result: list[dict] = []
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, prometheus.stderr.read()
            try:
                result = query("sbcrt_frames_processed_total")
            except (OSError, http.client.HTTPException):
                result = []  # still starting
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never stored sbcrt_frames_processed_total"
        assert result[0]["metric"]["job"] == "sbcrt" and float(result[0]["value"][1]) == len(photos)
        assert float(query("sbcrt_inference_seconds_count")[0]["value"][1]) == len(photos)
        assert float(query('up{job="sbcrt"}')[0]["value"][1]) == 1
        fired = query("sbcrt_events_total")
        assert fired[0]["metric"]["rule"] == "dog>=0.3" and float(fired[0]["value"][1]) == events
        info = query("sbcrt_model_info")[0]["metric"]
        assert info["architecture"] == "tiny" and info["classes"] == "4" and info["precision"] == "fp32"
        assert float(query("sbcrt_healthy")[0]["value"][1]) == 1  # an idle folder is healthy: its loop ticks
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        assert proc.signal(signal.SIGTERM) == 0


# -- the API, the token and hostile requests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(runtime_models: dict[str, Path], imagenet_samples, tmp_path_factory: pytest.TempPathFactory):
    """A watch on a folder of photos with --save and a token (from $SBCRT_HTTP_TOKEN), served on loopback."""
    root = tmp_path_factory.mktemp("guarded")
    folder, saved, out = root / "photos", root / "saved", root / "out.jsonl"
    folder.mkdir()
    for photo, _ in imagenet_samples[:5]:
        shutil.copy(photo, folder / photo.name)
    os.environ["SBCRT_HTTP_TOKEN"] = TOKEN  # WatchProcess passes the environment on
    try:
        proc = WatchProcess(str(folder), "--model", str(runtime_models["tiny"]), "--jsonl", str(out), "--settle",
                            "0", "--http", "127.0.0.1:0", "--stats-interval", "1", "--when", "dog>=0.3",
                            "--debounce", "1", "--cooldown", "0", "--save", str(saved))  # fmt: skip
    finally:
        del os.environ["SBCRT_HTTP_TOKEN"]
    port = serving_port(proc)
    proc.wait_for(lambda: out.exists() and len(read_jsonl(out)) == 5 and proc.count("stats:") >= 1, 60, "the photos")
    yield {"proc": proc, "port": port, "saved": saved, "out": out, "root": root}
    code = proc.signal(signal.SIGTERM)
    assert code == 0
    assert not any("Traceback" in line for line in proc.stderr_lines), "\n".join(proc.stderr_lines)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_api_matches_the_records_and_payloads(guarded) -> None:
    port, out = guarded["port"], guarded["out"]
    status, headers, body = get(port, "/api/latest", AUTH)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == read_jsonl(out)[-1]  # exactly the last JSONL line
    status, _, body = get(port, "/api/stats", AUTH)
    stats = json.loads(body)
    assert status == 200 and stats["mqtt"] is None and stats["top"]["frame"] == read_jsonl(out)[-1]["frame"]
    assert set(stats) == {"final", "uptime_s", "interval_s", "frames_read", "frames_processed", "frames_skipped",
                          "errors", "reconnects", "camera_fps", "processed_fps", "skipped_fps", "inference_ms",
                          "total_ms", "top", "mqtt"}  # fmt: skip
    assert stats["frames_processed"] == 5 and stats["errors"] == 0
    status, _, body = get(port, "/api/events", AUTH)
    events = json.loads(body)
    fired = [r for r in read_jsonl(out) if "events" in r]
    assert status == 200 and [e["frame"] for e in events] == [r["frame"] for r in fired] and events
    for event in events:
        assert set(event) == {"rule", "event_type", "label", "prob", "frame", "time", "source", "snapshot", "topk"}
        assert Path(event["snapshot"]).parent == guarded["saved"].resolve() or Path(event["snapshot"]).is_file()
        name = Path(event["snapshot"]).name
        status, headers, body = get(port, f"/snapshots/{name}", AUTH)
        assert status == 200 and body == Path(event["snapshot"]).read_bytes()
        assert headers["Content-Type"] == "image/jpeg"
    status, _, body = get(port, "/api/history?window=60", AUTH)
    history = json.loads(body)
    assert status == 200 and history["step_s"] == 1.0 and history["series"]
    assert {s["label"] for s in history["series"]} <= {"ant", "bee", "cat", "dog"}
    assert all(0 <= v <= 1 for s in history["series"] for v in s["values"])
    status, _, body = get(port, "/api/model", AUTH)
    model = json.loads(body)
    assert model["architecture"] == "tiny" and model["labels"] == ["ant", "bee", "cat", "dog"]
    assert model["rules"] == ["dog>=0.3"]
    status, headers, body = get(port, "/snapshot.jpg", AUTH)
    last = read_jsonl(out)[-1]
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Frame"] == str(last["frame"])
    assert body == Path(last["source"]).read_bytes()  # a folder's JPEG is served as it is, EXIF and all
    status, headers, body = get(port, "/", AUTH)
    assert status == 200 and b'<canvas id="chart"' in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    status, _, body = get(port, "/metrics", AUTH)
    assert status == 200 and b"sbcrt_frames_processed_total 5.0" in body
    status, _, body = get(port, "/api/latest", AUTH, method="HEAD")
    assert status == 200 and body == b""


def test_token_is_required_except_for_healthz(guarded) -> None:
    port = guarded["port"]
    name = next(guarded["saved"].iterdir()).name
    paths = ["/", "/api/latest", "/api/stats", "/api/events", "/api/history", "/api/model", "/metrics",
             "/snapshot.jpg", f"/snapshots/{name}"]  # fmt: skip
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):  # fmt: skip
            status, response_headers, body = get(port, path, headers)
            assert status == 401, (path, headers, status)
            assert b"token" in body and "Bearer" in response_headers["WWW-Authenticate"]
        assert get(port, path + ("&" if "?" in path else "?") + "token=wrong")[0] == 401
        assert get(port, path, AUTH)[0] == 200, path
        assert get(port, path + "?token=" + TOKEN)[0] == 200, path
    status, _, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["frames_processed"] == 5


def test_no_file_outside_the_saved_snapshots(guarded) -> None:
    port, saved, root = guarded["port"], guarded["saved"], guarded["root"]
    secret = root / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for the web")
    real = sorted(saved.iterdir())[0].name
    stamp = real.split("_", 1)[0]
    (saved / f"{stamp}_999_link_0.99.jpg").symlink_to(secret)  # named like a saved frame, pointing out
    (saved / "notes.txt").write_text("not a snapshot")
    (saved / f"{stamp}_998_dir_0.50.jpg").mkdir()
    for path in (
        "/snapshots/../secret.jpg",
        "/snapshots/..%2Fsecret.jpg",
        "/snapshots/%2e%2e%2fsecret.jpg",
        "/snapshots/..%5Csecret.jpg",
        f"/snapshots/{stamp}_999_link_0.99.jpg",
        f"/snapshots/{stamp}_998_dir_0.50.jpg",
        "/snapshots/notes.txt",
        f"/snapshots/{secret}",
        f"/snapshots/%2F{str(secret).lstrip('/')}",
        f"/snapshots/{real}%00.txt",
        "/snapshots/",
        "/../../etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "/snapshot.jpg/../../etc/passwd",
    ):
        status, _, body = get(port, path, AUTH)
        assert status in (400, 404), (path, status)
        assert b"not for the web" not in body and b"root:" not in body
    assert get(port, f"/snapshots/{real}", AUTH)[0] == 200  # the real one still is served


def test_huge_malformed_and_unfinished_requests_fail_safely(guarded) -> None:
    port, out = guarded["port"], guarded["out"]
    cases = {
        "request line of 100 kB": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414, 431}),
        "headers of 300 kB": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 1000)
                                                         for i in range(300)) + b"\r\n", {431}),
        "a body on GET": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", {413}),
        "POST": (b"POST /api/latest HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", {405}),
        "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n", {400}),
        "bad version": (b"GET / HTTP/9.9\r\n\r\n", {505}),
        "an unknown method": (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", {501}),
        "bad query": (b"GET /api/history?window=abc HTTP/1.1\r\nHost: x\r\n" + b"Authorization: Bearer "
                      + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n", {400}),
        "many query fields": (b"GET /api/history?" + b"&".join(b"a%d=1" % i for i in range(50)) + b" HTTP/1.1\r\n"
                              b"Connection: close\r\n\r\n", {400}),
    }  # fmt: skip
    for what, (data, expected) in cases.items():
        started = time.monotonic()
        response = raw_exchange(port, data)
        assert status_of(response) in expected, (what, response[:200])
        assert time.monotonic() - started < 5, what  # answered and closed, not left hanging
    # A request that never ends (one byte a second, slowloris) is cut off after the timeout, not fed forever.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        closed_after = None
        for _ in range(40):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(1.0)
                if sock.recv(65536) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and closed_after < 15, closed_after
    # Meanwhile the loop went on and the server still answers at once.
    assert get(guarded["port"], "/healthz", timeout=2)[0] == 200
    assert len(read_jsonl(out)) == 5 and guarded["proc"].proc.poll() is None


def test_clients_that_stop_reading_or_hog_connections(guarded) -> None:
    port = guarded["port"]
    # A client asking for the snapshot 200 times without reading a byte (its receive buffer is tiny).
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    request = f"GET /snapshot.jpg HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    stuck.setblocking(False)
    try:
        for _ in range(200):
            stuck.send(request)
    except BlockingIOError:
        pass
    # 40 more connections that say nothing: more than the 32 slots.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.5)
        # Past the slots, connections are closed at once rather than queued: those see EOF immediately.
        refused = 0
        for sock in idle:
            sock.settimeout(0.2)
            try:
                refused += sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                refused += 1
        assert refused >= 5, refused  # 32 slots: the stuck client holds one, idle ones the rest
        # Once the timeout has freed the slots, the server answers again (and the stuck client is dropped).
        deadline, status = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            try:
                status = get(port, "/healthz", timeout=2)[0]
                break
            except (OSError, http.client.HTTPException):
                time.sleep(0.5)
        assert status == 200 and time.monotonic() < deadline
        stuck.setblocking(True)
        stuck.settimeout(15)  # the server's own 10 s timeout, with room for a loaded CI machine
        received, eof = 0, False
        try:
            while chunk := stuck.recv(65536):
                received += len(chunk)
            eof = True
        except ConnectionResetError:
            eof = True
        assert eof, "the server never dropped the client that stopped reading"
    finally:
        stuck.close()
        for sock in idle:
            sock.close()
    assert guarded["proc"].proc.poll() is None


# -- /healthz on a camera that freezes (in process, with a short stall limit) ---------------------------------------


def test_healthz_turns_503_when_the_camera_freezes(runtime_models: dict[str, Path]) -> None:
    classifier = Classifier(runtime_models["probe"], cache_dir=False)
    frames = [jpeg(numbered_frame(n)) for n in range(RED_PERIOD)]
    camera = MjpegServer(lambda n: frames[n % len(frames)], fps=20).start()
    sink = HttpSink(HttpSettings(port=0, stall_s=1.5, live=True))
    source = parse_source(camera.url, SourceOptions(timeout_s=1))
    options = LoopOptions(stall_timeout_s=30, stats_interval_s=0.5, backoff_initial_s=0.2, backoff_max_s=0.5)
    loop = WatchLoop(source, classifier, [sink], options=options)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()

    def health() -> tuple[int, dict]:
        status, _, body = get(sink.settings.port, "/healthz", timeout=2)
        return status, json.loads(body)

    def wait_for(status: int, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got, body = health()
            if got == status and body["frames_processed"] > 0:
                return body
            time.sleep(0.2)
        raise AssertionError(f"/healthz never returned {status}: {health()}")

    try:
        wait_for(200)  # frames flow
        camera.hang()  # connections stay open, no frame comes
        body = wait_for(503)
        assert body["status"] == "stalled" and body["last_frame_age_s"] >= 1.5
        status, _, metrics = get(sink.settings.port, "/metrics")
        assert b"sbcrt_healthy 0.0" in metrics
        camera.stop()
        camera.start()  # back on the same port: the loop reconnects
        before = body["frames_processed"]
        assert wait_for(200, timeout=40)["frames_processed"] > before
    finally:
        loop.stop()
        runner.join(20)
        camera.stop()
    assert not runner.is_alive()
    with pytest.raises(OSError):  # closed with the loop
        get(sink.settings.port, "/healthz", timeout=1)


# -- with MQTT: the queue's state on the page's API and in /metrics --------------------------------------------------


def test_mqtt_counters_in_stats_and_metrics(runtime_models: dict[str, Path], imagenet_samples, tmp_path: Path) -> None:
    pytest.importorskip("paho.mqtt.client", reason='paho-mqtt is not installed (pip install "sbcrt[mqtt]")')
    from tests.support.mqtt_broker import Broker

    broker = Broker(tmp_path / "broker").start()
    folder, out = tmp_path / "photos", tmp_path / "out.jsonl"
    folder.mkdir()
    for photo, _ in imagenet_samples[:3]:
        shutil.copy(photo, folder / photo.name)
    proc = WatchProcess(str(folder), "--model", str(runtime_models["tiny"]), "--jsonl", str(out), "--settle", "0",
                        "--http", "127.0.0.1:0", "--stats-interval", "1", "--mqtt", broker.url,
                        "--mqtt-topic", "farm/pen3", "--mqtt-stats-interval", "1")  # fmt: skip
    try:
        port = serving_port(proc)
        deadline, stats = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            status, _, body = get(port, "/api/stats")
            stats = json.loads(body) if status == 200 else None
            if stats and stats["frames_processed"] == 3 and stats["mqtt"]["sent"] > 0:
                break
            time.sleep(0.3)
        assert stats and stats["mqtt"]["connected"] is True and stats["mqtt"]["dropped"] == 0, stats
        assert set(stats["mqtt"]) == {"connected", "queued", "sent", "dropped", "reconnects"}
        _, _, metrics = get(port, "/metrics")
        text = metrics.decode()
        assert "sbcrt_mqtt_connected 1.0" in text and "sbcrt_mqtt_dropped_total 0.0" in text
        sent = float(re.search(r"^sbcrt_mqtt_sent_total (\S+)$", text, re.M)[1])
        assert sent >= stats["mqtt"]["sent"] > 0
    finally:
        assert proc.signal(signal.SIGTERM) == 0
        broker.stop()


def test_snapshot_is_scaled_for_the_page_and_encoded_at_most_once_a_second() -> None:
    sink = HttpSink(HttpSettings(port=0))
    port = sink.settings.port

    def feed(number: int) -> None:
        image = np.zeros((1080, 1920, 3), np.uint8)
        image[:, : 100 + number] = (0, 0, 255)  # a red band whose width tells the frames apart
        timing = Timing(capture=1, preprocess=1, inference=1, postprocess=1, total=4)
        record = Record(number, "t", "cam", [Prediction(0, "a", 1.0)], timing=timing)
        sink.record(record, Frame(number, time.time(), time.perf_counter(), 0.0, "cam", image=image))

    try:
        assert get(port, "/snapshot.jpg")[0] == 404  # no frame yet
        feed(1)
        status, headers, first = get(port, "/snapshot.jpg")
        assert status == 200 and headers["X-Frame"] == "1"
        page_size = (1080 * PAGE_WIDTH // 1920, PAGE_WIDTH, 3)
        assert cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape == page_size
        _, headers, full = get(port, "/snapshot.jpg?full=1")
        assert cv2.imdecode(np.frombuffer(full, np.uint8), cv2.IMREAD_COLOR).shape == (1080, 1920, 3)
        feed(2)  # a new frame within the second: the encoding of frame 1 is served again
        status, headers, again = get(port, "/snapshot.jpg")
        assert headers["X-Frame"] == "1" and again == first
        time.sleep(1.1)
        status, headers, newer = get(port, "/snapshot.jpg")
        assert headers["X-Frame"] == "2" and newer != first
    finally:
        sink.close()
