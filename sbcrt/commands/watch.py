"""`sbcrt watch`: classify a camera, stream, video file or folder continuously (see sbcrt/watch/)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sbcrt.commands.arguments import (
    add_model_arguments,
    load_classifier,
    non_negative_float,
    output_file,
    output_folder,
    positive_float,
    positive_int,
    resolve_model,
)
from sbcrt.errors import UsageError

if TYPE_CHECKING:  # the watch modules load only when watch runs: `sbcrt --help` stays light
    from sbcrt.watch.events import EventRules, Rule
    from sbcrt.watch.http import HttpSettings
    from sbcrt.watch.mqtt import MqttSettings
    from sbcrt.watch.sources import FrameSource

DEFAULT_SAVE_MAX = "1000,1GB"
DEFAULT_MQTT_QUEUE = 1000  # sbcrt.watch.mqtt.DEFAULT_QUEUE (not imported here: `sbcrt --help` stays light)


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
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """watch's arguments, also parsed by `sbcrt service install` to check a command line before it goes into a
    unit (paths are typed Path / output_file / output_folder so the service can find them)."""
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="0 | /dev/video0 | picamera2[:N] | rtsp://... | http(s)://... | video file | folder | 'glob/*.jpg'",
    )
    add_model_arguments(p, required_help="required", spin=False)
    p.add_argument("--labels", type=Path, help="class names, one per line (overrides the model's)")
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="classes per record (default 5)")
    p.add_argument("--jsonl", type=output_file, metavar="FILE", help="append records to FILE (default: stdout)")
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
        type=output_file,
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
    events.add_argument(
        "--save", type=output_folder, metavar="DIR", help="save the frames that fired an event into DIR"
    )
    events.add_argument(
        "--save-max",
        action="append",
        metavar="LIMIT",
        help=f"keep at most this many files (500) and/or bytes (2GB) in --save DIR, oldest removed "
        f"(default {DEFAULT_SAVE_MAX})",
    )
    add_mqtt_arguments(p)
    add_http_arguments(p)


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


@dataclass
class WatchPlan:
    """What a watch command line asks for, checked, before any model loads."""

    model: Path
    rules: list[Rule]
    events: EventRules | None
    max_files: int | None
    max_bytes: int | None
    mqtt_settings: MqttSettings | None
    http_settings: HttpSettings | None
    source: FrameSource  # not opened


def plan(args: argparse.Namespace) -> WatchPlan:
    """Everything a user can get wrong, checked before the model loads. Cameras and streams are not opened
    (a video file is probed: a file OpenCV cannot read is a bad argument)."""
    from sbcrt.watch.events import EventRules, parse_rule
    from sbcrt.watch.sinks import parse_save_limits
    from sbcrt.watch.sources import SourceOptions, parse_source

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
        mqtt_settings = mqtt_settings_from(args)
    elif any(getattr(args, flag) for flag in ("mqtt_topic", "mqtt_client_id", "mqtt_ca", "mqtt_results",
                                              "mqtt_discovery")):  # fmt: skip
        raise UsageError("the --mqtt-* options need --mqtt URL")
    # --http (sbcrt/watch/http.py): checked here, before the model loads; served by a sink added below.
    http_settings = None
    if args.http is not None:
        http_settings = http_settings_from(args)  # also checks that prometheus-client is installed
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
    return WatchPlan(model, rules, events, max_files, max_bytes, mqtt_settings, http_settings, source)


def http_settings_from(args: argparse.Namespace) -> HttpSettings:
    """--http* -> checked HttpSettings (the token may come from $SBCRT_HTTP_TOKEN)."""
    from sbcrt.watch.http import HttpSettings, check_settings, parse_address

    host, port = parse_address(args.http)
    token = args.http_token if args.http_token is not None else os.environ.get("SBCRT_HTTP_TOKEN") or None
    return check_settings(
        HttpSettings(
            host=host,
            port=port,
            token=token,
            insecure=args.http_insecure,
            save_dir=args.save,
            stats_interval_s=args.stats_interval,
        )  # fmt: skip
    )


def mqtt_settings_from(args: argparse.Namespace) -> MqttSettings:
    """--mqtt* -> checked MqttSettings (also checks that paho-mqtt is installed)."""
    import dataclasses

    from sbcrt.watch.mqtt import check_settings, default_topic, parse_mqtt_url

    settings = dataclasses.replace(
        parse_mqtt_url(args.mqtt),
        topic=args.mqtt_topic or default_topic(),
        discovery_prefix=args.mqtt_discovery_prefix,
        client_id=args.mqtt_client_id,
        qos=args.mqtt_qos,
        ca_file=args.mqtt_ca,
        results=args.mqtt_results,
        results_interval_s=args.mqtt_results_interval,
        stats_interval_s=args.mqtt_stats_interval,
        discovery=args.mqtt_discovery,
        queue_size=args.mqtt_queue,
        debounce=args.debounce,
    )
    return check_settings(settings)


def check(args: argparse.Namespace) -> None:
    """What `watch` checks at start, up to the point where it would open the source: the flags, the model (loaded,
    no graph cache written) and the rules' labels against it. `sbcrt service install` runs this."""
    checked = plan(args)
    classifier = load_classifier(args, checked.model, warmup=False, cache=False)
    if checked.events:
        checked.events.check_labels(classifier.labels)


def run(args: argparse.Namespace) -> int:
    restore_native_logs = quiet_native_logs() if args.quiet else lambda: None  # before OpenCV is imported
    try:
        return _run(args)
    finally:
        restore_native_logs()


def _run(args: argparse.Namespace) -> int:
    from sbcrt.watch.loop import LoopOptions, WatchLoop
    from sbcrt.watch.sinks import FrameSaver, HeartbeatSink, JsonlSink, StatsLogSink

    checked = plan(args)
    model, rules, events, source = checked.model, checked.rules, checked.events, checked.source
    max_files, max_bytes, mqtt_settings = checked.max_files, checked.max_bytes, checked.mqtt_settings
    http_settings = checked.http_settings

    restore_logging = configure_logging(quiet=args.quiet)
    listener = None
    try:
        if http_settings:  # the port first: a port in use should not cost a model load to find out
            from sbcrt.watch.http import open_listener

            listener = open_listener(http_settings)
        classifier = load_classifier(args, model)
        log = logging.getLogger("sbcrt.watch")
        for note in classifier.notes:
            log.info("note: %s", note)
        for warning in classifier.warnings:
            log.warning("%s", warning)
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

            sinks.append(
                MqttSink(
                    mqtt_settings,
                    labels=list(classifier.labels),
                    rules=[rule.text for rule in rules],
                    model_name=classifier.config.architecture,
                )
            )
        if http_settings:  # --http: after the saver (snapshot paths) and MQTT (its counters)
            from sbcrt.watch.http import HttpSink
            from sbcrt.watch.mqtt import MqttSink

            http_settings.live = source.live
            mqtt = next((sink for sink in sinks if isinstance(sink, MqttSink)), None)
            sinks.append(
                HttpSink(
                    http_settings,
                    model=classifier.describe(),
                    labels=list(classifier.labels),
                    rules=[rule.text for rule in rules],
                    source=source.describe(),
                    mqtt_counters=mqtt.publisher.counters if mqtt else None,
                    listener=listener,
                )
            )
            listener = None  # the sink's now: it closes it
        loop = WatchLoop(
            source,
            classifier,
            sinks,
            events=events,
            options=LoopOptions(
                top_k=args.top_k,
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
        if listener is not None:  # start-up failed before the sink took it
            listener.close()
        restore_logging()
    return 0


OPENCV_LOG_ERROR = 2  # cv2.utils.logging.LOG_LEVEL_ERROR
AV_LOG_FATAL = 8  # FFmpeg's av_log level: only messages about to abort


def quiet_native_logs() -> Callable[[], None]:
    """-q for the C++ libraries too: OpenCV's own warnings ("[ WARN:0@1.2] ... can't open camera by index") and
    FFmpeg's messages ("[tcp @ 0x..] Connection refused", "[mjpeg @ 0x..] error y=0") bypass Python's logging;
    the loop already reports the same failures in its own lines. Both variables are read when OpenCV starts and
    opens a capture; one a user set wins. Returns a function that puts the environment back (in-process callers)."""
    added = [name for name in ("OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_LOGLEVEL") if name not in os.environ]
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", str(AV_LOG_FATAL))
    # Already imported (sbcrt used as a library, or tests): OpenCV has read its variable; set the level directly.
    logging_api = getattr(getattr(sys.modules.get("cv2"), "utils", None), "logging", None)
    previous = None
    if logging_api is not None and os.environ["OPENCV_LOG_LEVEL"] == "ERROR":
        previous = logging_api.setLogLevel(OPENCV_LOG_ERROR)  # returns the level it replaces

    def restore() -> None:
        for name in added:
            os.environ.pop(name, None)
        if previous is not None:
            logging_api.setLogLevel(previous)

    return restore


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
