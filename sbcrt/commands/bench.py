"""`sbcrt bench`: inference latency of a model with the product's session settings, over a thread sweep."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from sbcrt.commands.arguments import add_model_arguments, positive_int, resolve_model
from sbcrt.errors import UsageError

SAMPLE_PHOTO = Path(__file__).resolve().parents[1] / "data" / "samples" / "chelsea.png"
# Pause before each block: the previous session's idle workers spin-wait for ~50 ms after its last run (measured
# with onnxruntime 1.32), and would take the cores the next session's threads need.
SETTLE_S = 0.1


def thread_list(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4] (order kept, repeats dropped)."""
    counts: list[int] = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected whole numbers like 1,2,4, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"thread counts must be at least 1, got {value}")
        if value not in counts:
            counts.append(value)
    return counts


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="measure inference latency (median/p90/p99) over a thread sweep",
        description="Inference latency of a model on one preprocessed photo, with the session sbcrt itself "
        "creates (providers, threads, spinning, graph cache). Thread counts are measured interleaved (a block "
        "of runs of each in turn), so a busy machine slows them alike. Also reports the session load time, the "
        "first (cold) run, peak memory and the machine.",
    )
    add_model_arguments(p, required_help="required", threads=False)
    p.add_argument(
        "--threads",
        type=thread_list,
        metavar="N[,N...]",
        help="intra-op thread counts to measure, e.g. 1,2,4 (default: one per physical core)",
    )
    p.add_argument("--runs", type=positive_int, default=50, help="timed runs per thread count (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per thread count first (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def machine_info() -> dict[str, Any]:
    """The CPU, its notable features and the runtime's versions and providers (what decides the kernels)."""
    import numpy as np
    import onnxruntime as ort

    from sbcrt import __version__
    from sbcrt.runtime.session import choose_providers, cpu_info, physical_cores

    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "machine": cpu.machine,
        "physical_cores": physical_cores(),
        "features": cpu.notable_features,
        "python": platform.python_version(),
        "sbcrt": __version__,
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "chosen_providers": choose_providers(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure(
    model: Path,
    threads: list[int],
    *,
    runs: int,
    warmup: int,
    spin: bool = True,
    cache_dir: bool | None = None,
    block: int = 5,
    engine: str = "auto",
    fp16: bool = False,
) -> dict[str, Any]:
    """Latency of `model` at each thread count, interleaved in blocks of `block` timed runs.

    Every block starts after a pause (SETTLE_S) and one untimed run: they absorb the switch from the previous
    session (its idle threads spinning, its weights in the caches).
    """
    from sbcrt.runtime.classifier import Classifier
    from sbcrt.runtime.evaluation import latency_summary

    sessions = []
    for count in threads:
        start = time.perf_counter()
        classifier = Classifier(
            model, threads=count, spin=spin, cache_dir=cache_dir, warmup=False, engine=engine, fp16=fp16
        )
        created_ms = (time.perf_counter() - start) * 1000
        tensor = classifier.preprocess(SAMPLE_PHOTO)
        start = time.perf_counter()
        classifier.run(tensor)
        first_run_ms = (time.perf_counter() - start) * 1000
        for _ in range(max(0, warmup)):
            classifier.run(tensor)
        sessions.append((count, classifier, tensor, created_ms, first_run_ms, []))

    while any(len(times) < runs for *_, times in sessions):
        for _, classifier, tensor, _, _, times in sessions:
            if len(times) >= runs:
                continue
            if len(sessions) > 1:
                time.sleep(SETTLE_S)
            classifier.run(tensor)
            for _ in range(min(block, runs - len(times))):
                start = time.perf_counter()
                classifier.run(tensor)
                times.append((time.perf_counter() - start) * 1000)

    first = sessions[0][1]
    results = []
    for count, classifier, _, created_ms, first_run_ms, times in sessions:
        summary = latency_summary(times)
        info = classifier.session_info
        results.append(
            {
                "threads": count,
                **summary,
                "images_per_s": 1000.0 / summary["median_ms"],
                "session_ms": created_ms,
                "graph_cache_hit": info.cache_hit,
                "first_run_ms": first_run_ms,
            }
        )
    return {
        "model": {
            "path": str(model),
            "architecture": first.config.architecture,
            "precision": first.config.precision,
            "untrained": first.config.untrained,
            "input_shape": list(first.input_shape),
            "engine": first.engine.name,
            "providers": first.session_info.providers,
            "spin": spin,
        },
        "runs": runs,
        "warmup": warmup,
        "results": results,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine_info(),
        "notes": list(first.notes),
    }


def run(args: argparse.Namespace) -> int:
    from sbcrt.runtime.session import physical_cores

    model = resolve_model(args, required=True)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, not {args.warmup}")
    threads = args.threads or [physical_cores()]
    report = measure(
        model,
        threads,
        runs=args.runs,
        warmup=args.warmup,
        spin=not args.no_spin,
        cache_dir=False if args.no_cache else None,
        engine=args.engine,
        fp16=args.fp16,
    )
    cores = report["machine"]["physical_cores"]
    if any(t > cores for t in threads):
        report["notes"].append(f"more threads than the {cores} physical cores: those runs share cores")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    model, machine = report["model"], report["machine"]
    untrained = ", UNTRAINED" if model["untrained"] else ""
    lines = [
        f"model: {model['path']} ({model['architecture']}, {model['precision']}{untrained}), input "
        f"{tuple(model['input_shape'])}, {model['engine']}: {', '.join(model['providers'])}",
        f"machine: {machine['cpu']} ({machine['machine']}), {machine['physical_cores']} physical cores; features: "
        f"{' '.join(machine['features']) or 'none of note'}; onnxruntime {machine['onnxruntime']}",
        f"{report['runs']} timed runs per thread count after {report['warmup']} warm-up runs, interleaved (ms):",
        f"  {'threads':>7} {'median':>8} {'p90':>8} {'p99':>8} {'min':>8} {'img/s':>7} {'load':>7} {'1st run':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"  {r['threads']:>7} {r['median_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r['min_ms']:8.2f} "
            f"{r['images_per_s']:7.1f} {r['session_ms']:7.0f} {r['first_run_ms']:8.1f}"
            + ("  (cached graph)" if r["graph_cache_hit"] else "")
        )
    lines.append(f"peak memory (RSS): {report['peak_rss_mb']:.0f} MB")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
