"""Helpers for the `sbcrt watch` tests and benchmark: a loopback MJPEG-over-HTTP camera, generated videos, a slow
model that still reports what it saw, and a `sbcrt watch` subprocess whose stderr a test can wait on."""

from __future__ import annotations

import http.server
import json
import math
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sbcrt" / "data" / "samples"

# Colours a frame number maps to, so the probe model (output = mean of each RGB channel on [0, 1]) can tell
# which frame it was given: red = (number * RED_STEP) % 256 levels; green and blue stay fixed. Steps of 16
# levels survive video codecs' rounding of a flat colour (measured: <= 4 levels for MJPG and mp4v). The fixed
# levels keep r + g + b away from 255, where the classifier would take the scores for probabilities already.
RED_STEP = 16
RED_PERIOD = 256 // RED_STEP
FIXED_GREEN, FIXED_BLUE = 40, 95


def numbered_frame(number: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A flat BGR frame whose red level encodes number % RED_PERIOD."""
    frame = np.empty((size[1], size[0], 3), np.uint8)
    frame[:, :] = (FIXED_BLUE, FIXED_GREEN, (number % RED_PERIOD) * RED_STEP)
    return frame


def decode_number(topk: list[dict]) -> int:
    """number % RED_PERIOD back from a probe model's record: log(p_red / p_blue) = mean_red - mean_blue."""
    probs = {p["label"]: p["prob"] for p in topk}
    red = (math.log(probs["red"] / probs["blue"]) * 255 + FIXED_BLUE) / RED_STEP
    return round(red) % RED_PERIOD


class MjpegServer:
    """A camera on 127.0.0.1 serving multipart/x-mixed-replace JPEG frames (what most IP cameras' /mjpeg does).

    The port stays the same across stop()/start(), like a camera that reboots. `hang()` keeps connections
    open but stops sending (a frozen camera); stop() closes them and refuses new ones (camera off).
    `frames` gives the JPEG for frame n; `fps` 0 sends as fast as the socket takes them.
    """

    def __init__(self, frames: Callable[[int], bytes], *, fps: float = 30.0, port: int = 0) -> None:
        self.frames = frames
        self.fps = fps
        self.port = port
        self.sent = 0  # frames sent since the first start (the server's own frame counter)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._serving = threading.Event()
        self._hanging = threading.Event()

    def start(self) -> MjpegServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                serving = owner._serving
                next_at = time.perf_counter()
                while serving.is_set():
                    if owner._hanging.is_set():
                        time.sleep(0.05)
                        continue
                    data = owner.frames(owner.sent)
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(b"Content-Length: %d\r\n\r\n" % len(data) + data + b"\r\n")
                    except OSError:
                        return
                    owner.sent += 1
                    if owner.fps:
                        next_at += 1.0 / owner.fps
                        time.sleep(max(0.0, next_at - time.perf_counter()))

            def log_message(self, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._hanging.clear()
        self._serving = threading.Event()
        self._serving.set()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def hang(self) -> None:
        self._hanging.set()

    def stop(self) -> None:
        self._serving.clear()  # open connections end: their handlers leave the loop and the socket closes
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def write_video(path: Path, frames: Sequence[np.ndarray], *, fourcc: str, fps: float = 10.0) -> bool:
    """Write frames with cv2.VideoWriter; False when this OpenCV build cannot write the codec."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        return False
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path.is_file() and path.stat().st_size > 0


def photo_frames(photos: Sequence[Path], size: tuple[int, int]) -> list[np.ndarray]:
    """Real photos as BGR frames of `size` (width, height), stretched."""
    return [cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_AREA) for p in photos]


def build_slow_probe(path: Path, *, size: int = 64, matmuls: int = 24, width: int = 384) -> Path:
    """A probe model (output = per-channel mean of the input, labels red/green/blue) that also runs a chain of
    `matmuls` width x width matrix products that depend on the input, multiplied by zero at the end: slow like
    a real model, yet it reports exactly which frame it was given. Orthogonal weights keep values finite."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbcrt.runtime.metadata import ModelConfig

    rng = np.random.default_rng(0)
    weight, _ = np.linalg.qr(rng.standard_normal((width, width)))
    base = rng.standard_normal((width, width)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "w"),
        numpy_helper.from_array(base, "base"),
        numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["means"]),
        helper.make_node("ReduceMean", ["image"], ["level"], keepdims=0),
        helper.make_node("Add", ["base", "level"], ["h0"]),
    ]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"h{matmuls}"], ["heavy"], keepdims=0),
        helper.make_node("Mul", ["heavy", "zero"], ["nothing"]),
        helper.make_node("Add", ["means", "nothing"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_probe",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    config = ModelConfig(
        architecture="slow_probe",
        num_classes=3,
        labels=["red", "green", "blue"],
        input_size=[3, size, size],
        crop_size=size,
        resize_size=size,
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
    )
    helper.set_model_props(model, config.to_props())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def rss_mb() -> float:
    """This process's resident memory (VmRSS) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class WatchProcess:
    """`python -m sbcrt watch ...` as a user runs it; its stderr is collected line by line for waiting on."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sbcrt", "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._changed = threading.Condition()
        for stream, lines in ((self.proc.stderr, self.stderr_lines), (self.proc.stdout, self.stdout_lines)):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not predicate():
                    if left > 0:
                        time.sleep(0.2)  # let the pumps read the last lines
                        if predicate():
                            return
                    raise AssertionError(f"timed out waiting for {what}; stderr:\n" + "\n".join(self.stderr_lines))
                self._changed.wait(min(left, 0.2))

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.stderr_lines)

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
