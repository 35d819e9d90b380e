"""A real Mosquitto broker for the MQTT tests and benchmark: started on free 127.0.0.1 ports with a generated
config, a plain listener and a TLS listener (certificates from a CA generated here with the openssl CLI), and
stoppable/restartable on the same ports like a broker that reboots. Plus a subscriber that records every message."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def require_mosquitto() -> str:
    """The broker binary; skips the test where Mosquitto is not installed, except in CI (CI=true), where a
    missing broker must fail the run instead of silently skipping the MQTT tests."""
    path = find_mosquitto()
    if path is None:
        message = "mosquitto is not installed (Debian: apt-get install -y --no-install-recommends mosquitto)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must install it (.ci/run)")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"


def make_certificates(folder: Path) -> dict[str, Path]:
    """A test CA and a server certificate for localhost/127.0.0.1 signed by it (EC P-256: fast to generate).
    The extensions are the ones strict verifiers (Python 3.13's VERIFY_X509_STRICT) insist on."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sbcrt test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder)  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=folder)  # fmt: skip
    for key in ("ca.key", "server.key"):
        (folder / key).chmod(0o644)  # mosquitto may run as another user and must read its key
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


class Broker:
    """mosquitto on 127.0.0.1:`port` (anonymous) and, with certificates, 127.0.0.1:`tls_port` (TLS, user
    `tls_user`/`tls_password` required). `persistence` keeps retained messages and sessions across restarts."""

    tls_user, tls_password = "pen3", "s3cret pass/word"

    def __init__(self, folder: Path, *, certificates: dict[str, Path] | None = None, persistence: bool = False) -> None:
        self.binary = require_mosquitto()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if certificates else None
        self.certificates = certificates
        self.persistence = persistence
        self.log_path = folder / "mosquitto.log"
        self.config_path = folder / "mosquitto.conf"
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            f"user {getpass.getuser()}",  # when run as root, stay root: the generated files are ours
            "per_listener_settings true",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        if self.certificates:
            passwords = self.folder / "passwords"
            passwords.write_text(f"{self.tls_user}:{self.tls_password}\n")
            subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True, capture_output=True, timeout=30)
            passwords.chmod(0o644)
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.certificates['ca']}",
                f"certfile {self.certificates['cert']}",
                f"keyfile {self.certificates['key']}",
                "allow_anonymous false",
                f"password_file {passwords}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Broker:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port) if p]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read()}\n{self.log_text()}")
            if all(_accepts(port) for port in ports):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen within {timeout} s:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float

    @property
    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A paho client subscribed to `topics` that records what arrives. `session` (a client id) asks the broker to
    keep the subscription and queue QoS 1 messages while this client is away (a broker restart, with
    persistence), so a test sees everything that was published."""

    def __init__(self, port: int, topics: list[str], *, session: str | None = None, qos: int = 1) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[Received] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.topics = topics
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session or "",
                                  clean_session=session is None)  # fmt: skip
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, qos) for t in topics])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the test subscriber could not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self.messages.append(Received(message.topic, message.payload, bool(message.retain), time.monotonic()))
            self._changed.notify_all()

    def on(self, topic: str) -> list[Received]:
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out waiting for {what}; topics seen: {seen}")
                self._changed.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic_filter: str, *, settle: float = 0.5) -> dict[str, bytes]:
    """What a client subscribing now gets as retained messages: {topic: payload}."""
    subscriber = Subscriber(port, [topic_filter])
    try:
        time.sleep(settle)
        return {m.topic: m.payload for m in subscriber.messages if m.retain}
    finally:
        subscriber.close()
