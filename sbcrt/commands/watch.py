"""`sbcrt watch`: classify a camera, stream, video file or folder continuously (see sbcrt/watch/)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from sbcrt.commands.classify import positive_int
from sbcrt.errors import UsageError

DEFAULT_SAVE_MAX = "1000,1GB"
DEFAULT_MQTT_QUEUE = 1000  # sbcrt.watch.mqtt.DEFAULT_QUEUE (not imported here: `sbcrt --help` stays light)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def resolution(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1920x1080, got {text!r}")
    return int(match[1]), int(match[2])


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "watch",
        help="classify a camera, stream, video or folder continuously",
        description="Classify frames from a camera (index, /dev/videoN, picamera2), an rtsp:// or http(s):// "
        "stream, a video file, or images arriving in a folder or matching a glob. One JSON record per processed "
        "frame; live statistics on stderr. Live sources that drop are reopened forever. SIGINT/SIGTERM finish the "
        "current frame and exit 0. Exit status 2: bad flags, unknown source, unusable model.",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="0 | /dev/video0 | picamera2[:N] | rtsp://... | http(s)://... | video file | folder | 'glob/*.jpg'",
    )
    p.add_argument("-m", "--model", type=Path, help="the .onnx model (required; default: $SBCRT_MODEL)")
    p.add_argument("--threads", type=positive_int, help="inference threads (default: one per physical core)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the optimised-graph cache")
    p.add_argument("--labels", type=Path, help="class names, one per line (overrides the model's)")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="classes per record (default 5)")
    p.add_argument("--jsonl", type=Path, metavar="FILE", help="append records to FILE (default: stdout)")
    p.add_argument(
        "--fps",
        type=positive_float,
        help="process at most this many frames per second (video files: sample this many per second of video)",
    )
    p.add_argument("--stride", type=positive_int, metavar="N", help="video files: process every Nth frame")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (no stats lines)")
    p.add_argument(
        "--stats-interval",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="seconds between statistics lines (default 5)",
    )

    live = p.add_argument_group("cameras and streams")
    live.add_argument(
        "--resolution", type=resolution, metavar="WxH", help="camera capture size (picamera2 default 1280x720)"
    )
    live.add_argument(
        "--timeout",
        type=positive_float,
        default=5.0,
        metavar="S",
        help="streams: open and read timeout; live sources silent for twice this long are reopened (default 5)",
    )

    folders = p.add_argument_group("folders and globs")
    folders.add_argument("--new-only", action="store_true", help="skip the images already there at start")
    folders.add_argument(
        "--settle",
        type=non_negative_float,
        default=1.0,
        metavar="S",
        help="read a file once unchanged for S seconds, so it is not read half-written (default 1)",
    )

    p.add_argument(
        "--heartbeat",
        type=Path,
        default=os.environ.get("SBCRT_HEARTBEAT") or None,
        metavar="FILE",
        help="touch FILE (at most every 5 s) while frames are processed, for health checks (default: $SBCRT_HEARTBEAT)",
    )

    events = p.add_argument_group("events")
    events.add_argument(
        "--when",
        action="append",
        default=[],
        metavar="RULE",
        help='fire an event when a label reaches a probability: "fox,coyote>=0.6" (repeatable)',
    )
    events.add_argument(
        "--debounce", type=positive_int, default=2, metavar="K", help="consecutive matching frames needed (default 2)"
    )
    events.add_argument(
        "--cooldown",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="seconds before the same rule fires again (default 60)",
    )
    events.add_argument("--save", type=Path, metavar="DIR", help="save the frames that fired an event into DIR")
    events.add_argument(
        "--save-max",
        action="append",
        metavar="LIMIT",
        help=f"keep at most this many files (500) and/or bytes (2GB) in --save DIR, oldest removed "
        f"(default {DEFAULT_SAVE_MAX})",
    )
    add_mqtt_arguments(p)
    add_http_arguments(p)
    return p


def add_mqtt_arguments(p: argparse.ArgumentParser) -> None:
    """--mqtt*: publish to a broker (sbcrt/watch/mqtt.py). Needs paho-mqtt, imported only when used."""
    mqtt = p.add_argument_group('MQTT (pip install "sbcrt[mqtt]")')
    mqtt.add_argument(
        "--mqtt",
        metavar="URL",
        help="publish to this broker: mqtt://[user:pass@]host[:1883] or mqtts://host[:8883] "
        "(user/password also from $SBCRT_MQTT_USERNAME/$SBCRT_MQTT_PASSWORD)",
    )
    mqtt.add_argument("--mqtt-topic", metavar="TOPIC", help="topic prefix (default sbcrt/<hostname>)")
    mqtt.add_argument("--mqtt-client-id", metavar="ID", help="MQTT client id (default sbcrt-<topic>)")
    mqtt.add_argument(
        "--mqtt-qos", type=int, choices=(0, 1, 2), default=1, help="QoS of state, events, results, stats (default 1)"
    )
    mqtt.add_argument("--mqtt-ca", type=Path, metavar="FILE", help="mqtts://: CA certificate(s) to trust (PEM)")
    mqtt.add_argument("--mqtt-results", action="store_true", help="also publish each frame's record to <topic>/result")
    mqtt.add_argument(
        "--mqtt-results-interval",
        type=non_negative_float,
        default=1.0,
        metavar="S",
        help="at most one record per S seconds on <topic>/result; 0 = every frame (default 1)",
    )
    mqtt.add_argument(
        "--mqtt-stats-interval",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="publish statistics at most every S seconds, at the --stats-interval cadence (default 30)",
    )
    mqtt.add_argument(
        "--mqtt-queue",
        type=positive_int,
        default=DEFAULT_MQTT_QUEUE,
        metavar="N",
        help=f"messages kept while the broker is unreachable, oldest dropped (default {DEFAULT_MQTT_QUEUE})",
    )
    mqtt.add_argument(
        "--mqtt-discovery", action="store_true", help="publish Home Assistant MQTT discovery configs (retained)"
    )
    mqtt.add_argument(
        "--mqtt-discovery-prefix",
        default="homeassistant",
        metavar="PREFIX",
        help="Home Assistant's discovery prefix (default homeassistant)",
    )


def add_http_arguments(p: argparse.ArgumentParser) -> None:
    """--http*: the page, JSON API and /metrics (sbcrt/watch/http.py). Needs prometheus-client, imported only
    when used."""
    web = p.add_argument_group('web page and Prometheus metrics (pip install "sbcrt[http]")')
    web.add_argument(
        "--http",
        metavar="[HOST:]PORT",
        help="serve the page, /api/*, /metrics and /healthz on this port (host default 127.0.0.1: this machine "
        "only; 0.0.0.0:8080 opens it to the network and needs --http-token)",
    )
    web.add_argument(
        "--http-token",
        metavar="TOKEN",
        help="require this token (Authorization: Bearer TOKEN, or ?token=TOKEN); default $SBCRT_HTTP_TOKEN",
    )
    web.add_argument(
        "--http-insecure", action="store_true", help="allow --http beyond loopback without a token (warns)"
    )


def run(args: argparse.Namespace) -> int:
    from sbcrt.commands.classify import load_classifier, resolve_model
    from sbcrt.watch.events import EventRules, parse_rule
    from sbcrt.watch.loop import LoopOptions, WatchLoop
    from sbcrt.watch.sinks import FrameSaver, HeartbeatSink, JsonlSink, StatsLogSink, parse_save_limits
    from sbcrt.watch.sources import SourceOptions, parse_source

    # Everything a user can get wrong is checked before the model loads.
    model = resolve_model(args, required=True)
    if args.fps and args.stride:
        raise UsageError("--fps and --stride both subsample; use one")
    rules = [parse_rule(text) for text in args.when]
    if args.save_max and not args.save:
        raise UsageError("--save-max needs --save DIR")
    if args.save and not rules:
        raise UsageError("--save keeps the frames that fire an event: add a --when rule")
    max_files, max_bytes = parse_save_limits(args.save_max or [DEFAULT_SAVE_MAX])
    mqtt_settings = None
    if args.mqtt:
        from sbcrt.watch.mqtt import settings_from_args

        mqtt_settings = settings_from_args(args)  # also checks that paho-mqtt is installed
    elif any(getattr(args, flag) for flag in ("mqtt_topic", "mqtt_client_id", "mqtt_ca", "mqtt_results",
                                              "mqtt_discovery")):  # fmt: skip
        raise UsageError("the --mqtt-* options need --mqtt URL")
    # --http (sbcrt/watch/http.py): checked here, before the model loads; served by a sink added below.
    http_settings = None
    if args.http is not None:
        from sbcrt.watch.http import settings_from_args as http_settings_from_args

        http_settings = http_settings_from_args(args)  # also checks that prometheus-client is installed
    elif args.http_token or args.http_insecure:
        raise UsageError("--http-token and --http-insecure need --http [HOST:]PORT")
    events = EventRules(rules, debounce=args.debounce, cooldown_s=args.cooldown) if rules else None
    source = parse_source(
        args.source,
        SourceOptions(
            resolution=args.resolution,
            timeout_s=args.timeout,
            fps=args.fps,
            stride=args.stride,
            new_only=args.new_only,
            settle_s=args.settle,
        ),
    )

    restore_logging = configure_logging(quiet=args.quiet)
    try:
        args.no_spin = True  # the capture thread shares the cores: spinning inference threads would starve it
        classifier = load_classifier(args, model)
        log = logging.getLogger("sbcrt.watch")
        for note in classifier.notes:
            log.info("note: %s", note)
        if events:
            events.check_labels(classifier.labels)
        sinks = [JsonlSink(args.jsonl)]
        if args.save:
            sinks.append(FrameSaver(args.save, max_files=max_files, max_bytes=max_bytes))
        sinks.append(StatsLogSink())
        if args.heartbeat:
            sinks.append(HeartbeatSink(args.heartbeat))
        if mqtt_settings:
            from sbcrt.watch.mqtt import MqttSink

            saver = next((sink for sink in sinks if isinstance(sink, FrameSaver)), None)
            sinks.append(
                MqttSink(
                    mqtt_settings,
                    labels=list(classifier.labels),
                    rules=[rule.text for rule in rules],
                    model_name=classifier.config.architecture,
                    snapshot_path=saver.saved_path if saver else None,  # the saver runs first: the path is known
                )
            )
        if http_settings:  # --http: after the saver (snapshot paths) and MQTT (its counters)
            from sbcrt.watch.http import HttpSink
            from sbcrt.watch.mqtt import MqttSink

            http_settings.live = source.live
            saver = next((sink for sink in sinks if isinstance(sink, FrameSaver)), None)
            mqtt = next((sink for sink in sinks if isinstance(sink, MqttSink)), None)
            sinks.append(
                HttpSink(
                    http_settings,
                    model=classifier.describe(),
                    labels=list(classifier.labels),
                    rules=[rule.text for rule in rules],
                    source=source.describe(),
                    snapshot_path=saver.saved_path if saver else None,
                    mqtt_counters=mqtt.publisher.counters if mqtt else None,
                )
            )
        loop = WatchLoop(
            source,
            classifier,
            sinks,
            events=events,
            options=LoopOptions(
                top_k=args.top_k,
                fps=args.fps,
                stats_interval_s=args.stats_interval,
                stall_timeout_s=2 * args.timeout,
            ),
        )
        restore_signals = install_stop_signals(loop.stop)
        try:
            loop.run()
        finally:
            restore_signals()
    finally:
        restore_logging()
    return 0


def configure_logging(*, quiet: bool) -> Callable[[], None]:
    """Timestamped lines on stderr for the `sbcrt.watch` logger; returns a function that undoes it."""
    logger = logging.getLogger("sbcrt.watch")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    previous = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]

    return restore


def install_stop_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGINT and SIGTERM stop the loop after the current frame; a second one ends the process at once (the
    default action). Returns a function restoring the previous handlers. Only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    log = logging.getLogger("sbcrt.watch")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(signum: int, _frame: object) -> None:
        log.info("%s: finishing the current frame (send it again to quit at once)", signal.Signals(signum).name)
        stop()
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)

    for sig in previous:
        signal.signal(sig, handle)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
