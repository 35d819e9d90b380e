"""Does the broker's health change inference? And how many records does an outage lose?

    python benchmarks/mqtt_outage.py [--model build/efficientnet_lite0.onnx] [--seconds 20] [--out FILE.json]

Runs the watch loop in-process on a loopback MJPEG camera (20 fps) with the MQTT sink publishing every frame's
record to a real Mosquitto broker, for --seconds in each case: no MQTT at all (baseline), broker up, broker down
the whole time, broker flapping (stopped and started every 2 s). Reports inference and end-to-end (total) latency
percentiles from the loop's own statistics, and what the publisher sent, dropped and queued.

Then the outage arithmetic: a broker down N seconds costs max(0, messages/s x N - queue) messages (oldest
dropped). Measured once with a small queue to check the formula against the publisher's drop counter, then
tabulated for the default queue (1000) at the measured frame rate and at the default --mqtt-results-interval (1 s).
Without --model, the slow probe model of the tests (~10-20 ms a frame here) stands in for a real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbcrt.runtime.classifier import Classifier  # noqa: E402
from sbcrt.watch.loop import LoopOptions, WatchLoop  # noqa: E402
from sbcrt.watch.mqtt import DEFAULT_QUEUE, MqttSettings, MqttSink  # noqa: E402
from sbcrt.watch.sinks import Sink  # noqa: E402
from sbcrt.watch.sources import SourceOptions, parse_source  # noqa: E402
from tests.support.mqtt_broker import Broker  # noqa: E402
from tests.support.watch import RED_PERIOD, MjpegServer, build_slow_probe, jpeg, numbered_frame  # noqa: E402

FLAP_S = 2.0


def run_case(model: Classifier, camera: MjpegServer, broker: Broker, case: str, seconds: float,
             queue: int = DEFAULT_QUEUE) -> dict:  # fmt: skip
    sinks: list[Sink] = []
    sink = None
    if case != "no mqtt":
        settings = MqttSettings(host="127.0.0.1", port=broker.port, topic="bench/pen", results=True,
                                results_interval_s=0, queue_size=queue)  # fmt: skip
        if case == "up":
            broker.start()
        sink = MqttSink(settings)
        sinks.append(sink)
    source = parse_source(camera.url, SourceOptions(timeout_s=5))
    loop = WatchLoop(source, model, sinks, options=LoopOptions(stats_interval_s=3600))
    stop_flapping = threading.Event()

    def flap() -> None:
        while not stop_flapping.wait(FLAP_S):
            broker.start() if broker.proc is None or broker.proc.poll() is not None else broker.stop()

    flapper = threading.Thread(target=flap, daemon=True)
    if case == "flapping":
        flapper.start()
    threading.Timer(seconds, loop.stop).start()
    counters_before_close = None
    if sink is not None:
        original_close = sink.close

        def close() -> None:
            nonlocal counters_before_close
            counters_before_close = sink.publisher.counters()
            original_close()

        sink.close = close
    stats = loop.run().snapshot(source.frames_read, source.frames_skipped, final=True)
    stop_flapping.set()
    if case == "flapping":
        flapper.join()
    broker.stop()
    return {
        "case": case,
        "frames": stats["frames_processed"],
        "processed_fps": stats["processed_fps"],
        "inference_ms": stats["inference_ms"],
        "total_ms": stats["total_ms"],
        "mqtt": counters_before_close,
    }


def measured_loss(model: Classifier, camera: MjpegServer, broker: Broker, outage_s: float, queue: int) -> dict:
    """Broker down for outage_s in the middle of a run: the publisher's drop count vs the formula."""
    settings = MqttSettings(host="127.0.0.1", port=broker.port, topic="bench/loss", results=True,
                            results_interval_s=0, queue_size=queue)  # fmt: skip
    broker.start()
    sink = MqttSink(settings)
    source = parse_source(camera.url, SourceOptions(timeout_s=5))
    loop = WatchLoop(source, model, [sink], options=LoopOptions(stats_interval_s=3600))
    marks: dict[str, int] = {}

    def outage() -> None:
        time.sleep(2.0)
        broker.stop()
        marks["down_at"] = loop.stats.processed
        time.sleep(outage_s)
        marks["up_at"] = loop.stats.processed
        broker.start()
        deadline = time.monotonic() + 40  # reconnect backoff: up to the next attempt (1, 2, 4, 8, ... 30 s)
        while time.monotonic() < deadline and not sink.publisher.counters()["connected"]:
            time.sleep(0.1)
        marks["reconnected_at"] = loop.stats.processed
        time.sleep(2.0)
        loop.stop()

    threading.Thread(target=outage, daemon=True).start()
    loop.run()
    broker.stop()
    # Until the publisher is connected again (the broker's outage plus the wait for the next reconnect attempt).
    during = marks["reconnected_at"] - marks["down_at"]
    return {"outage_s": outage_s, "queue": queue, "records_until_reconnected": during,
            "predicted_lost": max(0, during - queue), "dropped": sink.publisher.dropped}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an .onnx classifier (default: the tests' slow probe model)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per case (default 20)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "mqtt_outage.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model_path = args.model or build_slow_probe(folder / "slow_probe.onnx")
        model = Classifier(model_path, spin=False)
        frames = [jpeg(numbered_frame(n, (640, 480))) for n in range(RED_PERIOD)]
        camera = MjpegServer(lambda n: frames[n % RED_PERIOD], fps=20).start()
        broker = Broker(folder / "broker")
        try:
            cases = [run_case(model, camera, broker, case, args.seconds)
                     for case in ("no mqtt", "up", "down", "flapping")]  # fmt: skip
            loss = measured_loss(model, camera, broker, outage_s=8.0, queue=50)
        finally:
            camera.stop()
            broker.stop()
    fps = next(c["processed_fps"] for c in cases if c["case"] == "up")
    table = [{"outage_s": n, "lost_every_frame": max(0, round(fps * n) - DEFAULT_QUEUE),
              "lost_interval_1s": max(0, n - DEFAULT_QUEUE)} for n in (10, 60, 300, 900, 3600)]  # fmt: skip
    print(f"model {model_path.name}, camera 20 fps, {args.seconds:.0f} s per case, results published every frame")
    print(f"{'case':<10} {'frames':>7} {'fps':>6} {'inf p50':>8} {'inf p90':>8} {'inf p99':>8} {'total p50':>9} "
          f"{'total p90':>9} {'sent':>6} {'dropped':>7} {'queued':>6}")  # fmt: skip
    for c in cases:
        m = c["mqtt"] or {}
        print(f"{c['case']:<10} {c['frames']:>7} {c['processed_fps']:>6.1f} {c['inference_ms']['p50']:>8.2f} "
              f"{c['inference_ms']['p90']:>8.2f} {c['inference_ms']['p99']:>8.2f} {c['total_ms']['p50']:>9.2f} "
              f"{c['total_ms']['p90']:>9.2f} {m.get('sent', '-'):>6} {m.get('dropped', '-'):>7} "
              f"{m.get('queued', '-'):>6}")  # fmt: skip
    print(f"\nmeasured: broker down {loss['outage_s']:.0f} s with a queue of {loss['queue']}: "
          f"{loss['records_until_reconnected']} records until reconnected, predicted lost {loss['predicted_lost']}, "
          f"dropped {loss['dropped']}")  # fmt: skip
    print(
        f"\nlost in an outage at the default queue ({DEFAULT_QUEUE}): every frame at {fps:.1f} fps | "
        "--mqtt-results-interval 1 (default)"
    )
    for row in table:
        print(f"  {row['outage_s']:>5} s: {row['lost_every_frame']:>6} | {row['lost_interval_1s']:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": cases, "measured_loss": loss, "outage_table": table}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
