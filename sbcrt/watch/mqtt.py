"""`sbcrt watch --mqtt URL`: results leave the board through an MQTT broker (Mosquitto, EMQX) to Home Assistant,
Node-RED, InfluxDB/Grafana.

Topics under `--mqtt-topic` (default `sbcrt/<hostname>`):

    <topic>/available   "online" (retained) once connected; the broker publishes the last will "offline" (retained)
                        when the process dies or the board loses power, and a clean exit publishes it itself
    <topic>/state       the current top class after debounce, JSON, retained, published on change only
    <topic>/result      each processed frame's record (the --jsonl JSON), with --mqtt-results, rate-limited
    <topic>/event       each --when event, with the saved snapshot's path (--save) or null
    <topic>/stats       the loop's statistics (the stderr stats line as JSON) + the queue's counters + the latest top
                        class, at most every --mqtt-stats-interval seconds, and once at exit
    homeassistant/...   Home Assistant MQTT discovery configs (retained), with --mqtt-discovery

Why the broker can never slow inference: the sink (on the loop's thread) only serialises the message and appends
it to a bounded deque. One publisher thread drains the deque in order, handing paho one message at a time and
only while connected, so paho's own queue never grows; paho's network thread reconnects with backoff (1 s
doubling to 30 s). When the deque is full the oldest message is dropped and counted (`mqtt.dropped` in the stats).

Ordering and delivery: messages are published strictly in the order the loop produced them, one in flight at a
time. At QoS 1 (the default) a message in flight when the connection drops is resent after reconnecting (at
least once: the broker may see that one message twice, never out of order). Retained state is republished on
every reconnect (a restarted broker without persistence forgot it), and an older queued state never overwrites
a newer one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sbcrt import __version__
from sbcrt.errors import SettingError, UsageError
from sbcrt.watch.sinks import FailureLog, Sink
from sbcrt.watch.types import Event, Frame, Record
from sbcrt.watch.urls import redact_url

log = logging.getLogger("sbcrt.watch")

INSTALL_HINT = 'MQTT needs paho-mqtt: pip install "sbcrt[mqtt]"'
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_QUEUE = 1000
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30
FLUSH_S = 2.0  # at exit: how long queued messages may take to go out before "offline" and disconnect
# Stats published before the first frame have "top": null; HA shows the sensor as unknown then.
TOP_PERCENT = "{{ (value_json.top.prob * 100) | round(1) if value_json.top else None }}"
MAX_ENUM_LABELS = 200  # more classes (ImageNet's 1000) make the top class a plain text sensor
KEEPALIVE_S = 30  # the broker declares us dead (last will) after 1.5 x this without a packet


@dataclass
class MqttSettings:
    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs
    topic: str = "sbcrt"
    client_id: str | None = None
    qos: int = 1
    ca_file: Path | None = None
    results: bool = False
    results_interval_s: float = 1.0
    stats_interval_s: float = 30.0
    discovery: bool = False
    discovery_prefix: str = "homeassistant"
    queue_size: int = DEFAULT_QUEUE
    debounce: int = 2
    keepalive_s: int = KEEPALIVE_S

    @property
    def address(self) -> str:
        """host:port as logs show it (no credentials)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def default_topic() -> str:
    return f"sbcrt/{clean_topic_level(socket.gethostname())}"


def clean_topic_level(text: str) -> str:
    """A hostname (or any name) usable as one topic level: no wildcards, separators or spaces."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "board"


def check_topic(topic: str) -> str:
    topic = topic.strip().strip("/")
    if not topic or any(c in topic for c in "+#\0") or "//" in topic:
        raise SettingError("mqtt.topic", "a topic without wildcards (+ #) or empty levels, e.g. farm/pen3", topic)
    return topic


def parse_mqtt_url(url: str, env: dict[str, str] | None = None) -> MqttSettings:
    """mqtt://[user[:password]@]host[:port] or mqtts://... -> settings (host, port, tls, credentials).
    Credentials missing from the URL come from $SBCRT_MQTT_USERNAME / $SBCRT_MQTT_PASSWORD, which keeps the
    password out of `ps` and of the unit file."""
    env = os.environ if env is None else env
    parts = urlsplit(url.strip())
    if parts.scheme not in DEFAULT_PORTS:
        raise SettingError("mqtt.url", f"expected mqtt://host[:port] or mqtts://host[:port], got {redact_url(url)!r}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise SettingError("mqtt.url", "the port must be a number from 1 to 65535", redact_url(url)) from None
    if not parts.hostname:
        raise SettingError("mqtt.url", "no broker host", redact_url(url))
    if parts.path not in ("", "/") or parts.query:
        raise SettingError(
            "mqtt.url", "no path or query expected (the topic is {mqtt.topic})", redact_url(url), cites=["mqtt.topic"]
        )
    username = unquote(parts.username) if parts.username else env.get("SBCRT_MQTT_USERNAME") or None
    password = unquote(parts.password) if parts.password is not None else env.get("SBCRT_MQTT_PASSWORD") or None
    if password and not username:
        raise SettingError("mqtt.url", "a password without a user name (set it in the URL or $SBCRT_MQTT_USERNAME)")
    return MqttSettings(host=parts.hostname, port=port, tls=parts.scheme == "mqtts", username=username,
                        password=password)  # fmt: skip


def load_paho() -> Any:
    try:
        import paho.mqtt.client as paho
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    if not hasattr(paho, "CallbackAPIVersion"):
        raise UsageError(f"paho-mqtt 2.x is needed (found an older one): {INSTALL_HINT}")
    return paho


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    seq: int  # submission order, to tell a stale retained message from the newest one


class MqttPublisher:
    """A paho client plus the thread that feeds it from a bounded queue. `submit()` never blocks."""

    def __init__(self, settings: MqttSettings, *, announce: Callable[[], list[Message]] | None = None) -> None:
        paho = load_paho()
        self.settings = settings
        self._announce = announce or (lambda: [])  # discovery configs, published after each connect
        self._queue: deque[Message] = deque()
        self._lock = threading.Condition()
        self._seq = 0
        self._latest_retained: dict[str, Message] = {}  # topic -> newest retained message submitted
        self._published_retained_seq: dict[str, int] = {}
        self._connected = False
        self._generation = 0  # successful connections so far
        self._announced = 0  # the generation whose announcements went out
        self._closing = False
        self._published_mids: set[int] = set()
        self.sent = 0
        self.dropped = 0
        self.reconnects = 0
        self._down_since: float | None = time.monotonic()
        # Failed connection attempts: the first is logged, then a reminder every few minutes (sinks.REMIND_S).
        self._attempts = FailureLog()

        client_id = settings.client_id or f"sbcrt-{clean_topic_level(settings.topic.replace('/', '-'))}"[:64]
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SettingError("mqtt.ca_file", str(exc), str(settings.ca_file)) from None
        client.will_set(self.topic("available"), b"offline", qos=max(settings.qos, 1), retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        self._client = client
        self._thread = threading.Thread(target=self._run, name="sbcrt-mqtt", daemon=True)

    def topic(self, leaf: str) -> str:
        return f"{self.settings.topic}/{leaf}"

    def start(self) -> MqttPublisher:
        # connect_async + loop_start: the first connection is attempted by paho's thread, so a broker that is
        # down (or a name that does not resolve yet at boot) never delays the loop's start.
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self._client.loop_start()
        self._thread.start()
        log.info("mqtt: publishing to %s under %s/", self.settings.address, self.settings.topic)
        return self

    # -- called from the loop's thread: O(1), never waits for the network ------------------------------------

    def submit(self, leaf: str, payload: dict[str, Any] | str, *, retain: bool = False) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload, separators=(",", ":")).encode()
        with self._lock:
            self._seq += 1
            message = Message(self.topic(leaf), data, self.settings.qos, retain, self._seq)
            if retain:
                self._latest_retained[message.topic] = message
            self._queue.append(message)
            while len(self._queue) > self.settings.queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._lock.notify_all()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {"connected": self._connected, "queued": len(self._queue), "sent": self.sent,
                    "dropped": self.dropped, "reconnects": self.reconnects}  # fmt: skip

    # -- paho's callbacks (paho's network thread) -------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._note_failure(f"the broker refused the connection: {reason_code}")
            return
        with self._lock:
            if self._down_since is not None and self._generation:
                log.warning("mqtt: connected to %s again after %.1f s; %d queued, %d dropped so far",
                            self.settings.address, time.monotonic() - self._down_since, len(self._queue),
                            self.dropped)  # fmt: skip
            elif not self._generation:
                log.info("mqtt: connected to %s", self.settings.address)
            if self._generation:
                self.reconnects += 1
            self._generation += 1
            self._connected = True
            self._down_since = None
            self._attempts.recovered()
            self._lock.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            if was_connected and not self._closing:
                self._down_since = time.monotonic()
                log.warning("mqtt: lost the connection to %s (%s); reconnecting with backoff (%d-%d s), "
                            "queueing up to %d messages", self.settings.address, reason_code, RECONNECT_MIN_S,
                            RECONNECT_MAX_S, self.settings.queue_size)  # fmt: skip
            self._lock.notify_all()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._note_failure("cannot connect")

    def _note_failure(self, detail: str) -> None:
        """The first failed attempt is logged, then a reminder every few minutes (a months-long journal)."""
        with self._lock:
            when = self._attempts.failed()
            if self._down_since is None:
                self._down_since = time.monotonic()
            queued, dropped = len(self._queue), self.dropped
        first, remind = when == "first", when == "reminder"
        if first:
            log.warning("mqtt: %s: %s; retrying with backoff (%d-%d s)", self.settings.address, detail,
                        RECONNECT_MIN_S, RECONNECT_MAX_S)  # fmt: skip
        elif remind:
            log.warning("mqtt: %s still unreachable (%s); %d queued, %d dropped so far", self.settings.address,
                        detail, queued, dropped)  # fmt: skip

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self._published_mids.add(mid)
            self._lock.notify_all()

    # -- the publisher thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            with self._lock:
                while not self._closing and not (self._connected and (self._queue or self._needs_announce())):
                    self._lock.wait()
                if self._closing:
                    # At exit, what is queued gets FLUSH_S to go out, including the wait for a first connection:
                    # a short video may end before the broker has answered.
                    deadline = deadline or time.monotonic() + FLUSH_S
                    while not self._connected and time.monotonic() < deadline:
                        self._lock.wait(deadline - time.monotonic())
                    if not self._connected or time.monotonic() >= deadline:
                        return
                    if not self._queue and not self._needs_announce():
                        return
                if self._needs_announce():
                    generation = self._generation
                    batch = [self.control_message(self.topic("available"), b"online"), *self._announce()]
                    # The newest retained state, first: a broker restarted without persistence forgot it.
                    batch += [m for m in self._latest_retained.values() if m not in self._queue]
                else:
                    generation, batch = None, [self._queue.popleft()]
            for message in batch:
                if not self._publish(message, deadline):
                    break  # the connection dropped (QoS 0 lost) or time is up at exit
            else:
                if generation is not None:
                    with self._lock:
                        self._announced = generation

    def _needs_announce(self) -> bool:
        return self._connected and self._announced != self._generation

    def control_message(self, topic: str, payload: bytes) -> Message:
        """Availability and discovery: retained, at least QoS 1 (they must not be lost), outside the queue."""
        return Message(topic, payload, max(self.settings.qos, 1), True, 0)

    def _publish(self, message: Message, deadline: float | None) -> bool:
        """Hand one message to paho and wait until it is out (QoS 0: written; QoS 1/2: acknowledged).
        Returns False if it could not be sent (connection lost at QoS 0, or the exit deadline)."""
        if message.retain and message.seq:
            with self._lock:
                if message.seq < self._published_retained_seq.get(message.topic, 0):
                    return True  # a newer state already went out (announced after a reconnect)
        while True:
            with self._lock:
                generation = self._generation
            info = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            with self._lock:
                while info.mid not in self._published_mids:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    if message.qos == 0 and (self._generation != generation or not self._connected):
                        break  # a QoS 0 packet not written before the drop is gone: send it again
                    self._lock.wait(0.2 if deadline is None else max(0.01, min(0.2, deadline - time.monotonic())))
                else:
                    self._published_mids.discard(info.mid)
                    self.sent += 1
                    if message.retain and message.seq:
                        self._published_retained_seq[message.topic] = max(
                            message.seq, self._published_retained_seq.get(message.topic, 0)
                        )
                    return True
                # QoS 0 retry: wait for the next connection (or the exit)
                while not self._connected and not self._closing:
                    self._lock.wait()
                if not self._connected:
                    return False

    def close(self) -> None:
        """Flush what is queued for up to FLUSH_S while connected, say "offline" (a clean exit sends no last will),
        disconnect."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(FLUSH_S + 1.0)
        with self._lock:
            connected, left = self._connected, len(self._queue)
        if connected:
            info = self._client.publish(self.topic("available"), b"offline", qos=max(self.settings.qos, 1),
                                        retain=True)  # fmt: skip
            with contextlib.suppress(RuntimeError, ValueError):  # disconnected meanwhile: the last will says it
                info.wait_for_publish(1.0)
        self._client.disconnect()
        self._client.loop_stop()
        if left or self.dropped:
            log.warning("mqtt: %d messages not sent at exit, %d dropped by the full queue", left, self.dropped)


class MqttSink(Sink):
    """The `watch` sink: turns records, events and stats into messages for the publisher."""

    name = "mqtt"

    def __init__(
        self,
        settings: MqttSettings,
        *,
        labels: list[str] | None = None,
        rules: list[str] | None = None,
        model_name: str = "",
    ) -> None:
        self.settings = settings
        self.labels = labels or []
        self.rules = rules or []
        self.model_name = model_name
        self._state: str | None = None
        self._candidate: tuple[str, int] | None = None  # a new top class and for how many frames it has held
        self._top: dict[str, Any] | None = None
        self._next_result = 0.0
        self._next_stats = 0.0
        self.publisher = MqttPublisher(settings, announce=self._discovery_messages if settings.discovery else None)
        self.publisher.start()

    def record(self, record: Record, frame: Frame) -> None:
        top = record.topk[0] if record.topk else None
        if top is not None:
            self._top = {"label": top.label, "prob": top.prob, "frame": record.frame, "time": record.time}
            self._update_state(top.label, top.prob, record)
        if self.settings.results:
            now = time.monotonic()
            if now >= self._next_result:
                self._next_result = now + self.settings.results_interval_s
                self.publisher.submit("result", record.to_json())

    def _update_state(self, label: str, prob: float, record: Record) -> None:
        """The top class changes once a new one has been on top for `debounce` consecutive frames."""
        if label == self._state:
            self._candidate = None
            return
        held = self._candidate[1] + 1 if self._candidate and self._candidate[0] == label else 1
        self._candidate = (label, held)
        if held < self.settings.debounce and self._state is not None:
            return
        self._state, self._candidate = label, None
        payload = {"label": label, "prob": prob, "frame": record.frame, "time": record.time,
                   "source": record.source}  # fmt: skip
        self.publisher.submit("state", payload, retain=True)

    def event(self, event: Event, frame: Frame) -> None:
        # event.snapshot: set by the frame saver (--save), which gets every event before the other sinks.
        snapshot = str(event.snapshot) if event.snapshot else None
        topk = event.record.topk_json() if event.record else []
        payload = {**event.to_dict(), "event_type": event.rule, "snapshot": snapshot, "topk": topk}
        self.publisher.submit("event", payload)

    def stats(self, stats: dict[str, Any]) -> None:
        now = time.monotonic()
        if not stats.get("final") and now < self._next_stats:
            return
        self._next_stats = now + self.settings.stats_interval_s
        payload = {**stats, "top": self._top, "mqtt": self.publisher.counters()}
        self.publisher.submit("stats", payload)
        if stats.get("final"):
            counters = payload["mqtt"]
            log.info("mqtt: %d messages sent, %d dropped by the full queue, %d reconnects", counters["sent"],
                     counters["dropped"], counters["reconnects"])  # fmt: skip

    def close(self) -> None:
        self.publisher.close()

    # -- Home Assistant discovery ----------------------------------------------------------------------------

    def _discovery_messages(self) -> list[Message]:
        return [
            self.publisher.control_message(config_topic, json.dumps(config, separators=(",", ":")).encode())
            for config_topic, config in discovery_configs(self.settings, self.labels, self.rules, self.model_name)
        ]


def discovery_configs(
    settings: MqttSettings, labels: list[str], rules: list[str], model_name: str = ""
) -> list[tuple[str, dict[str, Any]]]:
    """Home Assistant MQTT discovery: (config topic, config) pairs, published retained after each connect.

    Topics are `<prefix>/<component>/<node>/<object>/config`, node = the sbcrt topic with "/" as "_" (one device
    per watched camera). Sensors: top class (from /state), top probability, inference time, processed fps and
    dropped messages (from /stats); one `event` entity with the --when rules as event types (from /event)."""
    node = clean_topic_level(settings.topic.replace("/", "_")).replace(".", "_")
    base = settings.topic
    device = {
        "identifiers": [f"sbcrt_{node}"],
        "name": f"sbcrt {settings.topic}",
        "manufacturer": "sbcrt",
        "model": model_name or "image classifier",
        "sw_version": __version__,
    }
    common = {
        "availability_topic": f"{base}/available",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "sbcrt", "sw_version": __version__},
        "qos": settings.qos,
    }
    sensors = [
        ("top_class", "Top class", f"{base}/state", "{{ value_json.label }}", {"icon": "mdi:eye"}),
        ("top_probability", "Top probability", f"{base}/stats", TOP_PERCENT,
         {"unit_of_measurement": "%", "state_class": "measurement", "suggested_display_precision": 0}),
        ("inference_ms", "Inference time", f"{base}/stats", "{{ value_json.inference_ms.p50 }}",
         {"unit_of_measurement": "ms", "state_class": "measurement", "entity_category": "diagnostic"}),
        ("processed_fps", "Processed fps", f"{base}/stats", "{{ value_json.processed_fps }}",
         {"unit_of_measurement": "fps", "state_class": "measurement", "entity_category": "diagnostic"}),
        ("mqtt_dropped", "MQTT messages dropped", f"{base}/stats", "{{ value_json.mqtt.dropped }}",
         {"state_class": "total_increasing", "entity_category": "diagnostic"}),
    ]  # fmt: skip
    configs: list[tuple[str, dict[str, Any]]] = []
    for object_id, name, state_topic, template, extra in sensors:
        config = {"name": name, "unique_id": f"sbcrt_{node}_{object_id}", "object_id": f"sbcrt_{node}_{object_id}",
                  "state_topic": state_topic, "value_template": template, **extra, **common}  # fmt: skip
        if object_id == "top_class" and 0 < len(labels) <= MAX_ENUM_LABELS:
            config["device_class"] = "enum"
            config["options"] = list(labels)
        configs.append((f"{settings.discovery_prefix}/sensor/{node}/{object_id}/config", config))
    if rules:
        configs.append(
            (
                f"{settings.discovery_prefix}/event/{node}/alert/config",
                {"name": "Alert", "unique_id": f"sbcrt_{node}_alert", "object_id": f"sbcrt_{node}_alert",
                 "state_topic": f"{base}/event", "event_types": list(rules), "icon": "mdi:alert", **common},
            )
        )  # fmt: skip
    return configs


def check_settings(settings: MqttSettings) -> MqttSettings:
    """The settings checked before the model loads (and paho-mqtt importable); topics cleaned."""
    load_paho()
    if settings.ca_file is not None:
        if not settings.tls:
            raise SettingError("mqtt.ca_file", "is for mqtts:// URLs")
        if not settings.ca_file.is_file():
            raise SettingError("mqtt.ca_file", "no such file", str(settings.ca_file))
    settings.topic = check_topic(settings.topic)
    settings.discovery_prefix = check_topic(settings.discovery_prefix)
    return settings
