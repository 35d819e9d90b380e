"""SBCFormer latency: sbcrt fp32 and int8 against the authors' PyTorch model, torch.jit, plain onnxruntime and
OpenVINO, on the same seeded weights, interleaved in one process. Writes JSON and a PNG.

    python benchmarks/latency.py --arch all --threads 1,2 --json build/benchmarks/latency.json
    python benchmarks/latency.py --arch sbcformer_b --threads 1 --json OUT.json      # the contract below

Needs the export extras (torch, onnx) and matplotlib for the PNG; OpenVINO is optional
(`pip install openvino`: skipped with a note when it is not importable).

Configs, each fed the same preprocessed photo:
- torch_eager: the authors'-style model (`get_architecture(arch).build(1000)`, seeded by `randomize`), eval mode,
  torch.inference_mode, torch.set_num_threads(threads);
- torch_jit: the same model through torch.jit.trace + torch.jit.freeze;
- ort_plain: `export_model(rewrite=False, opset=18)` (BatchNorm folded, the authors' graph structure) run with
  onnxruntime's defaults except intra_op_num_threads;
- openvino: OpenVINO's CPU plugin on the ort_plain file (latency hint, one stream, fp32 inference precision);
- sbcrt_fp32 / sbcrt_int8: sbcrt's default export (rewrites on, opset 20) and its int8 export (calibrated on 100
  shared photos), run through `sbcrt.Classifier(threads=threads).run`, the product's session settings;
- sgemm: numpy float32 1024x1024 matmul in a one-thread worker process (OPENBLAS_CORETYPE/L2_SIZE unset, so a
  current OpenBLAS picks its own kernel), the machine's fp32 reference rate;
- camera_frame (SBCFormer-XS runs only): a 1080p BGR frame to the input tensor, `Classifier.preprocess(frame,
  bgr=True, fast=True)`, the path `classify_frame` takes.

Interleaving: configs take turns in rounds; each turn is a 0.1 s pause and one untimed run (they absorb the switch
from the previous config: its idle threads spin-wait for tens of ms, the caches hold its weights) and `--block`
timed runs. Without the pause, 2-thread variants lost a core to the previous variant's spinning threads (int8 looked
slower than fp32 at 2 threads). On a busy machine all configs are slowed alike, so their ratios stay meaningful even
when absolute times wander.

Output (contract other tools read), one per (arch, threads):
    {"arch", "threads", "macs", "sgemm_gflops", "configs": {NAME: {"median_ms", "p90_ms", ...}}, ...}
With one arch and one thread count, --json gets exactly that; with several it gets {"runs": [...], ...} and each
run is also written next to it as <stem>.<arch>.t<threads>.json. Exports are cached under build/benchmarks/models,
keyed by the export and model sources, so a changed exporter re-exports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/latency.py` as well as `python -m benchmarks.latency`

from benchmarks import preprocess as frame_bench  # noqa: E402
from benchmarks.common import BUILD, SelfTimed, export_cache_key, machine_info, shared_photos, take_turns  # noqa: E402
from sbcrt.runtime.evaluation import LogitComparison, evaluate, find_dataset, latency_summary  # noqa: E402

ARCHS = ("sbcformer_xs", "sbcformer_s", "sbcformer_b", "sbcformer_l")
SHARED_PHOTOS = shared_photos()
SEED = 0
CALIB_COUNT = 100
SGEMM_SIZE = 1024
# Pause before each turn: the previous variant's idle worker threads (OpenMP, TBB, onnxruntime) spin-wait for a
# while after its last run, and on 2 cores they take the core a 2-thread variant needs.
SETTLE_S = 0.1

# The paper's Table (WACV 2024): ImageNet top-1 (%), Raspberry Pi 4 latency (s) and Intel CPU latency (ms).
PAPER = {
    "sbcformer_xs": {"top1": 75.8, "pi4_ms": 610, "intel_ms": 47},
    "sbcformer_s": {"top1": 77.7, "pi4_ms": 730, "intel_ms": 55},
    "sbcformer_b": {"top1": 80.0, "pi4_ms": 930, "intel_ms": 76},
    "sbcformer_l": {"top1": 81.1, "pi4_ms": 1330, "intel_ms": 111},
}
LABELS = {
    "torch_eager": "PyTorch eager (authors')",
    "torch_jit": "torch.jit trace+freeze",
    "ort_plain": "onnxruntime, plain export",
    "openvino": "OpenVINO",
    "sbcrt_fp32": "sbcrt fp32",
    "sbcrt_int8": "sbcrt int8",
    "sgemm": "sgemm 1024^3 (1 thread)",
    "camera_frame": "1080p frame -> tensor",
}

# The sgemm worker: one BLAS thread, OPENBLAS_CORETYPE/L2_SIZE unset by the parent. Reads a count per line,
# answers with that many matmul times (s) as JSON; its first line says which BLAS kernel it runs.
SGEMM_WORKER = f"""
import json, sys, time
import numpy as np
try:
    from threadpoolctl import threadpool_info
    keys = ("internal_api", "version", "architecture", "num_threads")
    blas = [{{k: i.get(k) for k in keys}} for i in threadpool_info()]
except ImportError:  # threadpoolctl only names the kernel; the timing does not need it
    blas = [{{"internal_api": "unknown (pip install threadpoolctl)"}}]
rng = np.random.default_rng(0)
a = rng.standard_normal(({SGEMM_SIZE}, {SGEMM_SIZE}), dtype=np.float32)
b = rng.standard_normal(({SGEMM_SIZE}, {SGEMM_SIZE}), dtype=np.float32)
out = np.empty_like(a)
np.matmul(a, b, out=out)
print(json.dumps(blas), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)
"""


@dataclass
class Config:
    """One way of running the model: `infer()` runs it once on the shared input; `logits()` for parity."""

    name: str
    infer: Callable[[], Any]
    logits: Callable[[], np.ndarray] | None = None
    times_ms: list[float] = field(default_factory=list)
    timer: Callable[[int], list[float]] | None = None  # runs n timed iterations itself (the sgemm worker)


# -- exports (cached) ------------------------------------------------------------------------------------------


def cached_export(arch: str, variant: str, *, force: bool = False) -> tuple[Path, dict[str, Any]]:
    """The (path, info) of `arch` exported as variant "plain", "fp32" or "int8" (weights: seed SEED, or the
    real ones for EfficientNet-Lite0)."""
    from sbcrt.export.pipeline import export_model

    folder = BUILD / "models" / export_cache_key(f"seed={SEED}", f"calib={CALIB_COUNT}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{arch}.{variant}.onnx"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file() and not force:
        return path, json.loads(info_path.read_text())
    kwargs: dict[str, Any] = {"raw_graph_stats": False, "seed": SEED}
    if not arch.startswith("efficientnet"):
        kwargs["random_init"] = True
    if variant == "plain":
        kwargs.update(rewrite=False, opset=18)
    elif variant == "int8":
        kwargs.update(int8=True, calib_dir=SHARED_PHOTOS, calib_count=CALIB_COUNT)
    print(f"  exporting {arch} ({variant}) ...", flush=True)
    report = export_model(arch, path, **kwargs)
    info = {"macs": report.macs, "parameters": report.parameters, "seconds": report.seconds, "notes": report.notes}
    info_path.write_text(json.dumps(info))
    return path, info


# -- configs ---------------------------------------------------------------------------------------------------


def torch_configs(arch: str, tensor: np.ndarray, threads: int, skip: set[str]) -> list[Config]:
    import torch

    from sbcrt.export.random_weights import randomize
    from sbcrt.models.registry import get_architecture

    torch.set_num_threads(threads)
    model = randomize(get_architecture(arch).build(1000), SEED).eval()
    x = torch.from_numpy(tensor)

    def eager() -> Any:
        with torch.inference_mode():
            return model(x)

    configs = [Config("torch_eager", eager, lambda: eager().numpy())]
    if "torch_jit" not in skip:
        with torch.no_grad():
            frozen = torch.jit.freeze(torch.jit.trace(model, x).eval())

        def jit() -> Any:
            with torch.no_grad():
                return frozen(x)

        for _ in range(3):  # the profiling executor optimises the graph on the first runs
            jit()
        configs.append(Config("torch_jit", jit, lambda: jit().numpy()))
    return configs


def ort_plain_config(path: Path, tensor: np.ndarray, threads: int) -> Config:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # everything else: onnxruntime's defaults
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def infer() -> Any:
        return session.run(None, {name: tensor})[0]

    return Config("ort_plain", infer, infer)


def openvino_config(path: Path, tensor: np.ndarray, threads: int) -> Config:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32",  # no bf16/fp16 shortcuts: the same arithmetic as the others
        },
    )
    request = compiled.create_infer_request()

    def infer() -> Any:
        return request.infer({0: tensor})[0]

    return Config("openvino", infer, lambda: np.asarray(infer()).copy())


def sbcrt_config(name: str, path: Path, tensor: np.ndarray, threads: int) -> tuple[Config, Any]:
    from sbcrt.runtime.classifier import Classifier

    classifier = Classifier(path, threads=threads, cache_dir=BUILD / "graph-cache")
    return Config(name, lambda: classifier.run(tensor), lambda: classifier.run(tensor)), classifier


def camera_frame_config(classifier: Any, photos: list[Path]) -> Config:
    """1080p camera-like frames (benchmarks/preprocess.py's `camera_like`) through the fast frame path."""
    import cv2

    noise = np.random.default_rng(0).normal(0, 4, (1080, 1920, 3)).round().astype(np.int16)
    frames = [frame_bench.camera_like(cv2.imread(str(p), cv2.IMREAD_COLOR), (1920, 1080), noise) for p in photos]
    turn = iter(range(1 << 62))

    def infer() -> Any:
        return classifier.preprocess(frames[next(turn) % len(frames)], bgr=True, fast=True)

    return Config("camera_frame", infer)


class SgemmWorker:
    """A one-thread numpy process that times sgemm on request, so the machine's reference rate is measured in
    the same rounds as the models."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SGEMM_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.blas = json.loads(self.process.stdout.readline())

    def time(self, count: int) -> list[float]:
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        return [t * 1000 for t in json.loads(self.process.stdout.readline())]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


# -- one (arch, threads) run -----------------------------------------------------------------------------------


def run_interleaved(configs: list[Config], rounds: int, block: int) -> None:
    runs = {c.name: SelfTimed(c.timer) if c.timer else (lambda _turn, c=c: c.infer()) for c in configs}
    for name, ms in take_turns(runs, rounds, block=block, untimed=1, settle_s=SETTLE_S).items():
        next(c for c in configs if c.name == name).times_ms.extend(ms)


def measure(arch: str, threads: int, args: argparse.Namespace, sgemm: SgemmWorker) -> dict[str, Any]:
    from sbcrt.runtime.classifier import Classifier

    print(f"{arch}, {threads} thread(s): preparing", flush=True)
    skip = set(args.skip)
    skipped: dict[str, str] = {}
    plain_path, plain_info = cached_export(arch, "plain")
    fp32_path, fp32_info = cached_export(arch, "fp32")
    photo = sorted(SHARED_PHOTOS.glob("*.JPEG"))[0]
    tensor = Classifier(fp32_path, threads=1, cache_dir=False, warmup=False).preprocess(photo)

    configs = torch_configs(arch, tensor, threads, skip)
    if "ort_plain" not in skip:
        configs.append(ort_plain_config(plain_path, tensor, threads))
    if "openvino" not in skip:
        try:
            configs.append(openvino_config(plain_path, tensor, threads))
        except ImportError:
            skipped["openvino"] = "openvino is not installed (pip install openvino)"
    fp32, fp32_classifier = sbcrt_config("sbcrt_fp32", fp32_path, tensor, threads)
    configs.append(fp32)
    int8_path = None
    if "sbcrt_int8" in skip:
        skipped["sbcrt_int8"] = "--skip"
    else:
        int8_path, _ = cached_export(arch, "int8")
        configs.append(sbcrt_config("sbcrt_int8", int8_path, tensor, threads)[0])
    if arch == "sbcformer_xs" and "camera_frame" not in skip:
        configs.append(camera_frame_config(fp32_classifier, sorted(SHARED_PHOTOS.glob("*.JPEG"))[:8]))
    configs.append(Config("sgemm", lambda: None, timer=sgemm.time))
    for name in sorted(skip):
        skipped.setdefault(name, "--skip")

    # Same weights, same input: every fp32 config must give the eager model's logits (int8: its error).
    reference = configs[0].logits()
    parity = {}
    for config in configs[1:]:
        if config.logits is not None:
            comparison = LogitComparison()
            comparison.add(reference.reshape(-1), np.asarray(config.logits()).reshape(-1))
            summary = comparison.summary()
            parity[config.name] = {"relative_error": summary["relative_error_max"], "cosine": summary["cosine_min"]}

    print(
        f"{arch}, {threads} thread(s): {args.rounds} rounds x {args.block} runs of {len(configs)} configs", flush=True
    )
    run_interleaved(configs, args.rounds, args.block)

    macs = fp32_info["macs"]
    sgemm_times = next(c.times_ms for c in configs if c.name == "sgemm")
    sgemm_gflops = 2 * SGEMM_SIZE**3 / (float(np.median(sgemm_times)) * 1e6)
    result: dict[str, Any] = {
        "arch": arch,
        "threads": threads,
        "macs": macs,
        "macs_plain_export": plain_info["macs"],
        "sgemm_gflops": sgemm_gflops,
        "fp32_roofline_ms": 2 * macs / (sgemm_gflops * 1e6),
        "configs": {},
        "skipped": skipped,
        "parity_vs_torch_eager": parity,
    }
    for config in configs:
        if config.name == "sgemm":
            continue
        summary = latency_summary(config.times_ms)
        entry = {"median_ms": summary["median_ms"], "p90_ms": summary["p90_ms"], "p99_ms": summary["p99_ms"]}
        entry["runs"] = summary["count"]
        if config.name != "camera_frame":
            entry["gflops"] = 2 * macs / (summary["median_ms"] * 1e6)
        result["configs"][config.name] = entry
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The issue's targets as ratios (> 1 = faster)."""
    c = {name: entry["median_ms"] for name, entry in result["configs"].items()}
    out: dict[str, float] = {}
    if "sbcrt_fp32" in c:
        fp32 = c["sbcrt_fp32"]
        out["fp32_sgemm_fraction"] = result["fp32_roofline_ms"] / fp32
        peers = [c[p] for p in ("ort_plain", "openvino") if p in c]
        if peers:
            out["fp32_speedup_vs_best_peer"] = min(peers) / fp32
        if "torch_eager" in c:
            out["fp32_speedup_vs_torch_eager"] = c["torch_eager"] / fp32
        if "camera_frame" in c:
            out["camera_frame_fraction_of_fp32"] = c["camera_frame"] / fp32
    if "sbcrt_int8" in c:
        out["int8_speedup_vs_fp32"] = c["sbcrt_fp32"] / c["sbcrt_int8"]
        out["int8_speedup_vs_torch_eager"] = c["torch_eager"] / c["sbcrt_int8"]
    return out


# -- accuracy --------------------------------------------------------------------------------------------------


def accuracy(archs: list[str], threads: int, sbcformer_photos: int) -> dict[str, Any]:
    """int8 vs fp32: EfficientNet-Lite0 top-1 on the 250 shared photos (real weights), and SBCFormer's logit
    error on `sbcformer_photos` of them (seeded weights: top-1 means nothing there, the error does)."""
    from sbcrt.runtime.classifier import Classifier

    out: dict[str, Any] = {}
    for arch in ["efficientnet_lite0", *archs]:
        print(f"accuracy: {arch} int8 vs fp32", flush=True)
        fp32 = Classifier(cached_export(arch, "fp32")[0], threads=threads, cache_dir=BUILD / "graph-cache")
        int8 = Classifier(cached_export(arch, "int8")[0], threads=threads, cache_dir=BUILD / "graph-cache")
        limit = None if arch.startswith("efficientnet") else sbcformer_photos
        report = evaluate(find_dataset(SHARED_PHOTOS, fp32.labels, limit=limit), fp32, int8)
        out[arch] = {
            "images": report["dataset"]["images_evaluated"],
            "fp32_top1": report["model"]["top1"],
            "int8_top1": report["vs"]["top1"],
            "fp32_top5": report["model"]["top5"],
            "int8_top5": report["vs"]["top5"],
            **{k: v for k, v in report["comparison"].items() if k != "same_tensor"},
        }
    return out


def camera_agreement(photos: list[Path], models: dict[str, Path]) -> dict[str, Any]:
    """Top-1 agreement of the fast 1080p frame path with the exact photo path on the same frames."""
    import cv2

    from sbcrt.runtime.classifier import Classifier

    noise = np.random.default_rng(0).normal(0, 4, (1080, 1920, 3)).round().astype(np.int16)
    out = {}
    for name, path in models.items():
        print(f"camera path agreement: {name}", flush=True)
        classifier = Classifier(path, threads=2, cache_dir=BUILD / "graph-cache")
        comparison = LogitComparison()
        for photo in photos:
            frame = frame_bench.camera_like(cv2.imread(str(photo), cv2.IMREAD_COLOR), (1920, 1080), noise)
            exact = classifier.run(frame_bench.exact_from_bgr(frame, classifier.preprocessing))[0]
            fast = classifier.run(classifier.preprocess(frame, bgr=True, fast=True))[0]
            comparison.add(exact, fast)
        out[name] = comparison.summary()
    return out


# -- output ----------------------------------------------------------------------------------------------------


def print_table(runs: list[dict[str, Any]]) -> None:
    names = [n for n in LABELS if n != "sgemm" and any(n in r["configs"] for r in runs)]
    print(f"\n{'arch':14} {'thr':>3} " + " ".join(f"{n:>12}" for n in names) + "   sgemm GF/s")
    for r in runs:
        cells = [f"{r['configs'][n]['median_ms']:12.2f}" if n in r["configs"] else f"{'-':>12}" for n in names]
        print(f"{r['arch']:14} {r['threads']:>3} " + " ".join(cells) + f"   {r['sgemm_gflops']:.0f}")
    print("\nratios (> 1 = sbcrt faster):")
    for r in runs:
        text = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items())
        print(f"  {r['arch']} {r['threads']}t: {text}")


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The results as a Markdown table: median ms (p90) per config, and the target ratios."""
    names = [n for n in LABELS if n not in ("sgemm", "camera_frame") and any(n in r["configs"] for r in runs)]
    header = ["model", "threads", *(LABELS[n] for n in names), "sgemm GFLOP/s", "fp32 / sgemm", "fp32 vs best peer",
              "int8 vs fp32", "int8 vs eager"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [arch_title(r["arch"]), str(r["threads"])]
        for name in names:
            entry = r["configs"].get(name)
            cells.append(f"{entry['median_ms']:.1f} ({entry['p90_ms']:.1f})" if entry else "-")
        ratio = r["ratios"]
        cells.append(f"{r['sgemm_gflops']:.0f}")
        cells.append(f"{100 * ratio['fp32_sgemm_fraction']:.0f} %" if "fp32_sgemm_fraction" in ratio else "-")
        for key in ("fp32_speedup_vs_best_peer", "int8_speedup_vs_fp32", "int8_speedup_vs_torch_eager"):
            cells.append(f"{ratio[key]:.2f}x" if key in ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    thread_counts = sorted({r["threads"] for r in runs})
    archs = [a for a in ARCHS if any(r["arch"] == a for r in runs)]
    names = [n for n in LABELS if n not in ("sgemm", "camera_frame") and any(n in r["configs"] for r in runs)]
    fig, axes = plt.subplots(1, len(thread_counts) + 1, figsize=(6 * (len(thread_counts) + 1), 5))
    width = 0.8 / len(names)
    for ax, threads in zip(axes, thread_counts, strict=False):
        for i, name in enumerate(names):
            xs, medians, p90s = [], [], []
            for j, arch in enumerate(archs):
                run = next((r for r in runs if r["arch"] == arch and r["threads"] == threads), None)
                if run and name in run["configs"]:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    medians.append(run["configs"][name]["median_ms"])
                    p90s.append(run["configs"][name]["p90_ms"] - run["configs"][name]["median_ms"])
            ax.bar(xs, medians, width, yerr=[np.zeros(len(p90s)), p90s], label=LABELS[name], capsize=2)
        ax.set_xticks(range(len(archs)), [arch_title(a) for a in archs])
        ax.set_ylabel("latency, ms (median; whisker to p90)")
        ax.set_title(f"batch 1, {threads} thread{'s' if threads > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)

    ax = axes[-1]
    top1 = [PAPER[a]["top1"] for a in archs]
    ax.plot([PAPER[a]["pi4_ms"] for a in archs], top1, "s--", color="grey", label="paper: Raspberry Pi 4")
    ax.plot([PAPER[a]["intel_ms"] for a in archs], top1, "^--", color="black", label="paper: Intel CPU")
    threads = thread_counts[0]
    for name, marker in (("torch_eager", "o:"), ("sbcrt_fp32", "o-"), ("sbcrt_int8", "D-")):
        points = [
            (r["configs"][name]["median_ms"], PAPER[r["arch"]]["top1"])
            for r in runs
            if r["threads"] == threads and name in r["configs"]
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker, label=f"{LABELS[name]}, this machine, {threads} thread(s)")
    for arch, acc in zip(archs, top1, strict=True):
        ax.annotate(arch.replace("sbcformer_", "").upper(), (PAPER[arch]["pi4_ms"], acc), fontsize=8, xytext=(4, -10),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks([10, 20, 50, 100, 200, 500, 1000, 2000])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("latency per image, ms (log)")
    ax.set_ylabel("ImageNet top-1, % (the paper's; weights here are seeded)")
    ax.set_title("top-1 vs latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def arch_title(arch: str) -> str:
    return "SBCFormer-" + arch.removeprefix("sbcformer_").upper()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="sbcformer_xs/s/b/l or all (repeatable; default all)")
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2 (default 1,2)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    parser.add_argument("--block", type=int, default=3, help="timed runs per config per round (default 3)")
    parser.add_argument("--json", type=Path, default=BUILD / "latency.json", help="JSON output")
    parser.add_argument("--png", type=Path, help="chart (default: the JSON path with .png; 'none' to skip)")
    parser.add_argument(
        "--skip", default="", help="configs to leave out, comma-separated (e.g. torch_jit,openvino,accuracy,camera)"
    )
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw the chart and print the table from a saved JSON"
    )
    parser.add_argument("--accuracy-photos", type=int, default=50, help="photos for SBCFormer's int8 logit error")
    args = parser.parse_args(argv)
    archs = args.arch or ["all"]
    args.archs = list(ARCHS) if "all" in archs else [a.lower().replace("-", "_") for a in archs]
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown[0]!r} (one of {', '.join(ARCHS)}, all)")
    args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    args.skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        png = args.png or args.replot.with_suffix(".png")
        plot(saved.get("runs", [saved]), png)
        print(markdown_table(saved.get("runs", [saved])))
        print(f"wrote {png}")
        return 0
    single = len(args.archs) == 1 and len(args.thread_counts) == 1
    sgemm = SgemmWorker()
    try:
        runs = [measure(arch, t, args, sgemm) for arch in args.archs for t in args.thread_counts]
    finally:
        sgemm.close()
    for run in runs:
        run["machine"] = machine_info()
        run["sgemm_blas"] = sgemm.blas
    print_table(runs)
    print("\n" + markdown_table(runs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if single:
        args.json.write_text(json.dumps(runs[0], indent=2))
    else:
        for run in runs:
            path = args.json.with_name(f"{args.json.stem}.{run['arch']}.t{run['threads']}.json")
            path.write_text(json.dumps(run, indent=2))
        combined: dict[str, Any] = {"machine": machine_info(), "sgemm_blas": sgemm.blas, "runs": runs}
        combined["command"] = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if "accuracy" not in args.skip:
            combined["int8_accuracy"] = accuracy(args.archs, max(args.thread_counts), args.accuracy_photos)
            print(json.dumps(combined["int8_accuracy"], indent=2))
        if "camera" not in args.skip and "sbcformer_xs" in args.archs:
            models = {"sbcformer_xs": cached_export("sbcformer_xs", "fp32")[0]}
            models["efficientnet_lite0"] = cached_export("efficientnet_lite0", "fp32")[0]
            combined["camera_frame_agreement"] = camera_agreement(sorted(SHARED_PHOTOS.glob("*.JPEG")), models)
            print(json.dumps(combined["camera_frame_agreement"], indent=2))
        args.json.write_text(json.dumps(combined, indent=2))
    print(f"wrote {args.json}")
    png = None if args.png and str(args.png) == "none" else (args.png or args.json.with_suffix(".png"))
    if png is not None:
        try:
            plot(runs, png)
            print(f"wrote {png}")
        except ImportError:
            print("note: matplotlib is not installed: no chart (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
