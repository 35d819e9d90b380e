"""`sbcrt info`: versions, onnxruntime providers, CPU features, threads and (with --model) the model's metadata."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
from importlib import metadata
from typing import Any

from sbcrt.commands.arguments import add_model_arguments, load_classifier, resolve_model

PACKAGES = ("numpy", "onnxruntime", "ncnn", "pillow", "opencv-python-headless", "opencv-python")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="show versions, providers, CPU features and a model's metadata",
        description="What this device and runtime offer (versions, onnxruntime providers, CPU, threads, "
        "the graph cache) and, with --model, what the model says about itself.",
    )
    add_model_arguments(p, required_help="optional")
    p.add_argument("--json", action="store_true", help="one JSON object")
    return p


def gather(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from sbcrt import __version__
    from sbcrt.runtime.session import choose_providers, cpu_info, default_cache_dir, physical_cores

    versions = {"sbcrt": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):  # opencv comes as one of two packages
            versions[package] = metadata.version(package)
    cpu = cpu_info()
    cache = None if args.no_cache else default_cache_dir()
    report: dict[str, Any] = {
        "versions": versions,
        "cpu": {
            "machine": cpu.machine,
            "model": cpu.model,
            "physical_cores": physical_cores(),
            "notable_features": cpu.notable_features,
        },
        "onnxruntime": {"available_providers": ort.get_available_providers(), "chosen_providers": choose_providers()},
        "threads": args.threads or physical_cores(),
        "graph_cache": str(cache) if cache else None,
    }
    model = resolve_model(args, required=False)
    if model is not None:
        report["model"] = load_classifier(args, model, warmup=False).describe()
    return report


def run(args: argparse.Namespace) -> int:
    report = gather(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    v, cpu, rt = report["versions"], report["cpu"], report["onnxruntime"]
    lines = [
        "versions: " + ", ".join(f"{name} {version}" for name, version in v.items()),
        f"CPU: {cpu['model']} ({cpu['machine']}), {cpu['physical_cores']} physical cores; "
        f"features: {' '.join(cpu['notable_features']) or 'none of note'}",
        f"onnxruntime providers: {', '.join(rt['available_providers'])} (using {', '.join(rt['chosen_providers'])})",
        f"threads: {report['threads']}",
        f"optimised-graph cache: {report['graph_cache'] or 'off'}",
    ]
    model = report.get("model")
    if model:
        pre, session = model["preprocessing"], model["session"]
        cache_state = "cached optimised graph" if session["cache_hit"] else "optimised now"
        if session["engine"] == "ncnn":
            cache_state = "digests checked"  # ncnn packs its weights as it loads: there is no graph to cache
        lines += [
            f"model: {model['path']}",
            f"  architecture: {model['architecture']}"
            + ("" if model["has_metadata"] else " (no sbcrt metadata)")
            + (" - UNTRAINED (random weights)" if model["untrained"] else ""),
            f"  classes: {model['num_classes']}, input {model['input']['name']!r} {tuple(model['input']['shape'])}, "
            f"output {model['output']!r}, precision {model['precision']}",
            f"  preprocessing: shorter side to {pre['resize_size']} ({pre['interpolation']}), centre crop "
            f"{pre['crop'][0]}x{pre['crop'][1]}, mean {_floats(pre['mean'])}, std {_floats(pre['std'])}",
        ]
        if model["checkpoint_sha256"]:
            lines.append(f"  checkpoint sha256: {model['checkpoint_sha256']}")
        if model["exporter"]:
            lines.append(f"  exported by: {model['exporter']}")
        lines.append(
            f"  engine: {session['engine']} ({session['file']}): {', '.join(session['providers'])}, "
            f"{session['threads']} threads, "
            f"loaded in {session['load_ms']:.0f} ms ({cache_state})"
        )
        lines += [f"  note: {note}" for note in model["notes"]]
    print("\n".join(lines))
    sys.stdout.flush()
    return 0


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
