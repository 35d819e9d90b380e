"""Where a model's inference time goes in onnxruntime: kernel time per operator type and the slowest nodes.

    python benchmarks/profile_ops.py build/benchmarks/models/<key>/sbcformer_b.fp32.onnx --threads 1

The session uses sbcrt's settings (sbcrt/runtime/session.py: full optimisation, sequential execution, one inter-op
thread, spinning) plus onnxruntime's profiler, which session.py has no switch for. Times are the profiler's
kernel times summed per run (medians over runs), so they leave out the session's own overhead between kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(model: Path, threads: int, runs: int) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224), np.float32)}
        for _ in range(5):
            session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())

    per_run: list[dict[str, float]] = []  # op type -> µs, one dict per session.run
    per_node: dict[str, list[float]] = defaultdict(list)
    node_type: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            per_run.append(defaultdict(float))
        elif event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and per_run:
            op = event["args"]["op_name"]
            per_run[-1][op] += event["dur"]
            node = event["name"].removesuffix("_kernel_time")
            per_node[node].append(event["dur"])
            node_type[node] = op
    measured = per_run[5:]  # the warm-up runs are profiled too
    ops = sorted({op for run in measured for op in run})
    by_op = {op: statistics.median(run.get(op, 0.0) for run in measured) / 1000 for op in ops}
    total = sum(by_op.values())
    nodes = sorted(((statistics.median(v[5:] or v) / 1000, n) for n, v in per_node.items()), reverse=True)
    return {
        "model": str(model),
        "threads": threads,
        "runs": len(measured),
        "kernel_ms": total,
        "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "slowest_nodes": [{"node": n, "op": node_type[n], "ms": ms} for ms, n in nodes[:15]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = profile(args.model, args.threads, args.runs)
    print(f"{args.model.name}, {args.threads} thread(s): kernel time {report['kernel_ms']:.2f} ms per run (median)")
    for op, ms in report["by_op_ms"].items():
        print(f"  {op:28} {ms:7.2f} ms  {100 * ms / report['kernel_ms']:5.1f} %")
    print("slowest nodes:")
    for node in report["slowest_nodes"]:
        print(f"  {node['ms']:6.2f} ms  {node['op']:20} {node['node']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
