"""`sbcrt watch --mqtt` against a real Mosquitto broker on loopback (tests/mqtt_broker.py): the messages and their
order, retained state, the last will of a killed process, Home Assistant discovery, TLS with a generated CA and
credentials, a broker that restarts mid-run or is down from the start, and a queue that fills up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest

from sbcrt.errors import UsageError
from sbcrt.runtime.classifier import Prediction
from sbcrt.watch.mqtt import MqttSettings, MqttSink, parse_mqtt_url, redact_url
from sbcrt.watch.types import Record
from tests.support.mqtt_broker import Broker, Subscriber, make_certificates, retained
from tests.support.watch import (
    RED_PERIOD,
    MjpegServer,
    WatchProcess,
    jpeg,
    numbered_frame,
    read_jsonl,
    write_video,
)

pytest.importorskip("paho.mqtt.client", reason='paho-mqtt is not installed (pip install "sbcrt[mqtt]")')

NUMBERED_JPEGS = [jpeg(numbered_frame(n)) for n in range(RED_PERIOD)]
TOPIC = "farm/pen3"
RULE = "red>=0.45"  # fires on the reddest frames of each 16-frame cycle of numbered_frame()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path):
    server = Broker(tmp_path / "broker").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 frames (three red/blue cycles) as an MJPG video: the probe model's top class alternates blue/red."""
    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    if not write_video(path, [numbered_frame(n) for n in range(3 * RED_PERIOD)], fourcc="MJPG"):
        pytest.skip("this OpenCV build cannot write MJPG video")
    return path


def watch(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"} | (env or {})
    return subprocess.run([sys.executable, "-m", "sbcrt", "watch", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)  # fmt: skip


def records_in(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def frames_of(messages) -> list[int]:
    return [m.json()["frame"] for m in messages]


# -- flags --------------------------------------------------------------------------------------------------------


def test_url_credentials_and_mistakes() -> None:
    settings = parse_mqtt_url("mqtts://pen3:p%40ss%2Fw@broker.local", env={})
    assert (settings.host, settings.port, settings.tls) == ("broker.local", 8883, True)
    assert (settings.username, settings.password) == ("pen3", "p@ss/w")
    assert "p@ss" not in repr(settings) and settings.address == "mqtts://broker.local:8883"
    from_env = parse_mqtt_url("mqtt://10.0.0.2:1884", env={"SBCRT_MQTT_USERNAME": "u", "SBCRT_MQTT_PASSWORD": "pw"})
    assert (from_env.port, from_env.tls, from_env.username, from_env.password) == (1884, False, "u", "pw")
    assert parse_mqtt_url("mqtt://host", env={}).username is None
    assert redact_url("mqtt://u:secret@host:1883") == "mqtt://u:***@host:1883"
    for bad in ("http://host", "mqtt://", "mqtt://host:99999", "mqtt://host/topic", "broker.local"):
        with pytest.raises(UsageError) as caught:
            parse_mqtt_url(bad, env={})
        assert "secret" not in str(caught.value)
    with pytest.raises(UsageError, match="password without a user"):
        parse_mqtt_url("mqtt://host", env={"SBCRT_MQTT_PASSWORD": "pw"})


def test_flag_errors_are_one_line(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    model = str(runtime_models["probe"])
    cases = {
        ("--mqtt-topic", "x"): "need --mqtt URL",
        ("--mqtt", "mqtt://u:secret@127.0.0.1", "--mqtt-topic", "farm/+/x"): "without wildcards",
        ("--mqtt", "mqtt://127.0.0.1", "--mqtt-ca", str(tmp_path / "ca.pem")): "for mqtts://",
        ("--mqtt", "mqtts://127.0.0.1", "--mqtt-ca", str(tmp_path / "ca.pem")): "no such file",
        ("--mqtt", "ftp://u:secret@host"): "expected mqtt://",
    }
    for flags, message in cases.items():
        done = watch(str(tmp_path), "--model", model, *flags)
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "secret" not in done.stderr


def test_missing_paho_names_the_install_command(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    # sys.modules["paho"] = None is how Python itself spells "this package is absent": import raises ImportError.
    code = "import sys; sys.modules['paho'] = None; from sbcrt.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "watch", str(tmp_path), "--model", str(runtime_models["probe"]),
                           "--mqtt", "mqtt://127.0.0.1"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == 'sbcrt watch: error: MQTT needs paho-mqtt: pip install "sbcrt[mqtt]"'


# -- a whole run against the broker --------------------------------------------------------------------------------


def test_video_run_publishes_results_state_events_stats(
    broker: Broker, clip: Path, runtime_models: dict[str, Path], tmp_path: Path
) -> None:
    subscriber = Subscriber(broker.port, [f"{TOPIC}/#"])
    out, snapshots = tmp_path / "out.jsonl", tmp_path / "snapshots"
    done = watch(str(clip), "--model", str(runtime_models["probe"]), "--jsonl", str(out), "--mqtt", broker.url,
                 "--mqtt-topic", TOPIC, "--mqtt-results", "--mqtt-results-interval", "0", "--when", RULE,
                 "--cooldown", "0", "--save", str(snapshots))  # fmt: skip
    assert done.returncode == 0, done.stderr
    subscriber.wait_for(lambda: subscriber.on(f"{TOPIC}/available")[-1:] and
                        subscriber.on(f"{TOPIC}/available")[-1].text == "offline", 10, "offline")  # fmt: skip
    subscriber.close()
    records = read_jsonl(out)
    assert len(records) == 3 * RED_PERIOD

    # Every record, in order, exactly as in the JSONL file.
    assert [m.json() for m in subscriber.on(f"{TOPIC}/result")] == records

    # State: the top class after debounce (2 frames), on change only.
    states = [m.json() for m in subscriber.on(f"{TOPIC}/state")]
    labels = [s["label"] for s in states]
    assert labels[0] == records[0]["topk"][0]["label"] and len(labels) >= 4
    assert all(a != b for a, b in pairwise(labels)), labels  # never the same state twice in a row
    for state in states[1:]:  # a change is published on the second consecutive frame with the new top class
        index = state["frame"]
        assert [r["topk"][0]["label"] for r in records[index - 1 : index + 1]] == [state["label"]] * 2

    # Events: one per fired rule, with the snapshot the saver wrote.
    events = [m.json() for m in subscriber.on(f"{TOPIC}/event")]
    fired = [r["frame"] for r in records if r.get("events")]
    assert [e["frame"] for e in events] == fired and fired
    for event in events:
        assert event["rule"] == event["event_type"] == RULE and event["label"] == "red"
        assert Path(event["snapshot"]).parent == snapshots and Path(event["snapshot"]).is_file()

    # Stats at exit (final), with the publisher's counters; availability online then offline at a clean exit.
    final = subscriber.on(f"{TOPIC}/stats")[-1].json()
    assert final["final"] and final["frames_processed"] == len(records)
    assert final["top"]["frame"] == records[-1]["frame"]
    assert final["mqtt"]["dropped"] == 0 and final["mqtt"]["sent"] >= len(records) + len(states) + len(events)
    assert [m.text for m in subscriber.on(f"{TOPIC}/available")] == ["online", "offline"]

    # What a client subscribing later gets: the last state and "offline", retained.
    kept = retained(broker.port, f"{TOPIC}/#")
    assert set(kept) == {f"{TOPIC}/state", f"{TOPIC}/available"}
    assert json.loads(kept[f"{TOPIC}/state"]) == states[-1] and kept[f"{TOPIC}/available"] == b"offline"


def test_home_assistant_discovery(broker: Broker, clip: Path, runtime_models: dict[str, Path]) -> None:
    subscriber = Subscriber(broker.port, ["homeassistant/#", f"{TOPIC}/#"])
    done = watch(str(clip), "--model", str(runtime_models["probe"]), "--jsonl", os.devnull, "--mqtt", broker.url,
                 "--mqtt-topic", TOPIC, "--mqtt-discovery", "--when", RULE, "--when", "blue>=0.5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    subscriber.wait_for(lambda: subscriber.on(f"{TOPIC}/stats"), 10, "the final stats")
    subscriber.close()
    configs = {m.topic: m.json() for m in subscriber.messages if m.topic.startswith("homeassistant/")}
    node = "farm_pen3"
    assert set(configs) == {
        *(f"homeassistant/sensor/{node}/{s}/config" for s in ("top_class", "top_probability", "inference_ms",
                                                               "processed_fps", "mqtt_dropped")),
        f"homeassistant/event/{node}/alert/config",
    }  # fmt: skip
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    latest = {m.topic: m.json() for m in subscriber.messages if m.topic in (f"{TOPIC}/state", f"{TOPIC}/stats")}
    for topic, config in configs.items():
        assert config["availability_topic"] == f"{TOPIC}/available"
        assert config["device"]["identifiers"] == [f"sbcrt_{node}"] and config["device"]["model"] == "unknown"
        if "/event/" in topic:
            assert config["state_topic"] == f"{TOPIC}/event" and config["event_types"] == [RULE, "blue>=0.5"]
            continue
        # Each template reads keys the real payload on its state topic has (value_json.a.b -> payload["a"]["b"]).
        payload = latest[config["state_topic"]]
        for path in re.findall(r"value_json((?:\.\w+)+)", config["value_template"]):
            value = payload
            for key in path.strip(".").split("."):
                assert isinstance(value, dict) and key in value, (topic, path, payload)
                value = value[key]
            assert value is not None, (topic, path)
    assert configs[f"homeassistant/sensor/{node}/top_class/config"]["options"] == ["red", "green", "blue"]
    events = [m.json() for m in subscriber.messages if m.topic == f"{TOPIC}/event"]
    assert events and all(e["event_type"] in (RULE, "blue>=0.5") for e in events)


def test_tls_with_generated_ca_and_credentials_from_environment(
    tmp_path: Path, certificates: dict[str, Path], clip: Path, runtime_models: dict[str, Path]
) -> None:
    secure = Broker(tmp_path / "tls-broker", certificates=certificates).start()
    try:
        subscriber = Subscriber(secure.port, [f"{TOPIC}/#"])  # the plain listener sees what arrives over TLS
        credentials = {"SBCRT_MQTT_USERNAME": Broker.tls_user, "SBCRT_MQTT_PASSWORD": Broker.tls_password}
        base = [str(clip), "--model", str(runtime_models["probe"]), "--jsonl", os.devnull, "--mqtt-topic", TOPIC,
                "--mqtt-results", "--mqtt-results-interval", "0"]  # fmt: skip
        url = f"mqtts://localhost:{secure.tls_port}"
        done = watch(*base, "--mqtt", url, "--mqtt-ca", str(certificates["ca"]), env=credentials)
        assert done.returncode == 0, done.stderr
        subscriber.wait_for(lambda: len(subscriber.on(f"{TOPIC}/result")) == 3 * RED_PERIOD, 10, "results over TLS")
        assert Broker.tls_password not in done.stderr

        # Without the CA the server certificate is not trusted, and a wrong password is refused: each is logged,
        # nothing is published, and the video is still processed to the end.
        before = len(subscriber.messages)
        untrusted = watch(*base, "--mqtt", url, env=credentials)
        assert untrusted.returncode == 0 and "mqtt: mqtts://localhost" in untrusted.stderr, untrusted.stderr
        assert "summary: 48 frames" in untrusted.stderr
        wrong = watch(*base, "--mqtt", url, "--mqtt-ca", str(certificates["ca"]),
                      env={**credentials, "SBCRT_MQTT_PASSWORD": "wrong"})  # fmt: skip
        assert wrong.returncode == 0 and "refused the connection" in wrong.stderr, wrong.stderr
        assert "wrong" not in wrong.stderr.replace("refused", "")
        time.sleep(0.5)
        assert len(subscriber.messages) == before
        subscriber.close()
    finally:
        secure.stop()


# -- failures: a killed process, a broker that goes away ------------------------------------------------------------


def test_last_will_when_the_process_is_killed(broker: Broker, runtime_models: dict[str, Path]) -> None:
    camera = MjpegServer(lambda n: NUMBERED_JPEGS[n % RED_PERIOD], fps=10).start()
    subscriber = Subscriber(broker.port, [f"{TOPIC}/available"])
    watcher = WatchProcess(camera.url, "--model", str(runtime_models["probe"]), "--jsonl", os.devnull,
                           "--mqtt", broker.url, "--mqtt-topic", TOPIC)  # fmt: skip
    try:
        subscriber.wait_for(lambda: [m.text for m in subscriber.on(f"{TOPIC}/available")] == ["online"], 30, "online")
        killed_at = time.monotonic()
        watcher.proc.send_signal(signal.SIGKILL)
        watcher.proc.wait(10)
        subscriber.wait_for(lambda: len(subscriber.on(f"{TOPIC}/available")) == 2, 10, "the last will")
        will = subscriber.on(f"{TOPIC}/available")[-1]
        assert will.text == "offline" and will.at - killed_at < 5
        assert retained(broker.port, f"{TOPIC}/available") == {f"{TOPIC}/available": b"offline"}
    finally:
        watcher.kill()
        camera.stop()
        subscriber.close()


def test_broker_restart_mid_run_keeps_order_and_never_stalls_the_loop(
    tmp_path: Path, runtime_models: dict[str, Path]
) -> None:
    # Persistence keeps the test subscriber's session across the restart, so the broker queues for it what arrives
    # before it is back: the test sees everything sbcrt published.
    server = Broker(tmp_path / "broker", persistence=True).start()
    camera = MjpegServer(lambda n: NUMBERED_JPEGS[n % RED_PERIOD], fps=20).start()
    subscriber = Subscriber(server.port, [f"{TOPIC}/#"], session="restart-test")
    out = tmp_path / "out.jsonl"
    watcher = WatchProcess(camera.url, "--model", str(runtime_models["probe"]), "--fps", "10", "--jsonl", str(out),
                           "--mqtt", server.url, "--mqtt-topic", TOPIC, "--mqtt-results", "--mqtt-results-interval",
                           "0", "--stats-interval", "1", "--mqtt-stats-interval", "1")  # fmt: skip
    try:
        subscriber.wait_for(lambda: len(subscriber.on(f"{TOPIC}/result")) >= 10, 30, "results before the outage")
        server.stop()
        down_from = len(read_jsonl(out))
        time.sleep(3.0)
        during = read_jsonl(out)[down_from:]
        # The loop went on at its pace while the broker was away: ~10 records a second, no gap.
        assert len(during) >= 10, len(during)
        times = [time.mktime(time.strptime(r["time"][:19], "%Y-%m-%dT%H:%M:%S")) + float(r["time"][19:23])
                 for r in during]  # fmt: skip
        assert max(b - a for a, b in pairwise(times)) < 1.0
        server.start()
        last_during = during[-1]["frame"]
        subscriber.wait_for(lambda: any(f > last_during for f in frames_of(subscriber.on(f"{TOPIC}/result"))), 30,
                            "results after the restart")  # fmt: skip
        assert watcher.signal(signal.SIGTERM) == 0
        subscriber.wait_for(lambda: any(m.json()["final"] for m in subscriber.on(f"{TOPIC}/stats")), 10, "final")
    finally:
        watcher.kill()
        camera.stop()
        subscriber.close()
        server.stop()
    published = frames_of(subscriber.on(f"{TOPIC}/result"))
    # In order: QoS 1 may deliver the one message in flight at the drop twice, never out of order.
    assert all(a <= b for a, b in pairwise(published)), published
    assert len(published) - len(set(published)) <= 1
    # Nothing lost: every record written while the broker was down was published after it came back.
    assert {r["frame"] for r in during} <= set(published)
    assert set(published) == {r["frame"] for r in read_jsonl(out)}
    final = next(m.json() for m in subscriber.on(f"{TOPIC}/stats") if m.json()["final"])
    assert final["mqtt"]["reconnects"] == 1 and final["mqtt"]["dropped"] == 0
    assert watcher.count("mqtt: lost the connection") == 1 and watcher.count("mqtt: connected to") == 2


def test_broker_down_at_start_queue_keeps_the_newest(tmp_path: Path, runtime_models: dict[str, Path]) -> None:
    server = Broker(tmp_path / "broker", persistence=True).start()
    Subscriber(server.port, [f"{TOPIC}/#"], session="queue-test").close()  # the session waits in the broker
    server.stop()
    camera = MjpegServer(lambda n: NUMBERED_JPEGS[n % RED_PERIOD], fps=20).start()
    out = tmp_path / "out.jsonl"
    queue = 8
    watcher = WatchProcess(camera.url, "--model", str(runtime_models["probe"]), "--fps", "10", "--jsonl", str(out),
                           "--mqtt", server.url, "--mqtt-topic", TOPIC, "--mqtt-results", "--mqtt-results-interval",
                           "0", "--mqtt-queue", str(queue))  # fmt: skip
    subscriber = None
    try:
        watcher.wait_for(lambda: watcher.count("cannot connect") == 1, 30, "the failed first connection")
        deadline = time.monotonic() + 30
        while len(records_in(out)) < 3 * queue and time.monotonic() < deadline:
            time.sleep(0.2)
        server.start()
        subscriber = Subscriber(server.port, [f"{TOPIC}/#"], session="queue-test")
        subscriber.wait_for(lambda: subscriber.on(f"{TOPIC}/available"), 30, "the connection")
        assert watcher.signal(signal.SIGTERM) == 0
        subscriber.wait_for(lambda: subscriber.on(f"{TOPIC}/stats"), 10, "the final stats")
    finally:
        watcher.kill()
        camera.stop()
        if subscriber:
            subscriber.close()
        server.stop()
    records = read_jsonl(out)
    published = frames_of(subscriber.on(f"{TOPIC}/result"))
    assert published == sorted(set(published))
    # The oldest were dropped: the first records never left, and the final count says how many.
    assert records[0]["frame"] not in published and published
    final = subscriber.on(f"{TOPIC}/stats")[-1].json()
    assert final["final"] and final["mqtt"]["dropped"] >= 2 * queue
    assert final["mqtt"]["dropped"] + len(published) >= len(records) - 1


# -- the publisher in-process ----------------------------------------------------------------------------------------


def fake_record(frame: int, label: str, prob: float = 0.9) -> Record:
    return Record(frame, "2025-05-01T06:12:03.481+02:00", "test", [Prediction(0, label, prob)])


def test_retained_state_is_republished_after_a_broker_restart(broker: Broker) -> None:
    settings = MqttSettings(host="127.0.0.1", port=broker.port, topic=TOPIC, debounce=1)
    sink = MqttSink(settings)
    try:
        sink.record(fake_record(1, "fox"), None)
        sink.record(fake_record(2, "fox"), None)  # no change: not published again
        first = Subscriber(broker.port, [f"{TOPIC}/#"])
        first.wait_for(lambda: first.on(f"{TOPIC}/state"), 10, "the state")
        first.close()
        broker.restart()  # without persistence: the broker forgets every retained message
        deadline = time.monotonic() + 15
        while sink.publisher.counters()["reconnects"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        kept = retained(broker.port, f"{TOPIC}/#")
        assert kept[f"{TOPIC}/available"] == b"online"
        assert json.loads(kept[f"{TOPIC}/state"])["label"] == "fox"
        assert json.loads(kept[f"{TOPIC}/state"])["frame"] == 1
    finally:
        sink.close()


def test_submit_never_waits_for_an_absent_broker(tmp_path: Path) -> None:
    settings = MqttSettings(host="127.0.0.1", port=Broker(tmp_path / "never-started").port, topic=TOPIC,
                            results=True, results_interval_s=0, queue_size=100)  # fmt: skip
    sink = MqttSink(settings)
    try:
        slowest = 0.0
        for frame in range(5000):
            started = time.perf_counter()
            sink.record(fake_record(frame, "hen" if frame % 7 == 3 else "fox"), None)
            slowest = max(slowest, time.perf_counter() - started)
        counters = sink.publisher.counters()
        assert counters["queued"] == 100 and not counters["connected"]
        # 5000 results + 1 state (the first frame's: each "hen" lasts one frame, under the debounce of 2).
        assert counters["dropped"] == 5000 + 1 - 100
        assert slowest < 0.05, slowest  # a busy 2-core machine; a network wait would be seconds
    finally:
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 5  # the exit waits FLUSH_S for a broker, not forever
