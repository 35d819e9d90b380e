"""Guest side of the instruction counter for the ncnn peer: like count_inference.py, for an ncnn model.

    python3 count_ncnn.py MODEL.ncnn.param --input-shape 1,3,224,224 [--fp16] [--warmup 2] [--repeat 1]
        [--logits OUT.npy]

Runs under QEMU with the insn_count plugin; benchmarks/arm_count.py --peers starts it with the ncnn wheel on
PYTHONPATH (a folder of its own: ncnn is a peer we compare against, never part of sbcrt's userland). 1 thread,
fp32 unless --fp16 (ncnn's default on CPUs with fp16 arithmetic). The counted region is what an application
runs per inference: a new extractor, input, extract. Saves the logits for the host to check against
onnxruntime's on the same input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from count_inference import fixed_input, run_counted  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("param")
    parser.add_argument("--input-shape", required=True)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logits")
    args = parser.parse_args(argv)

    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = 1
    for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        if not args.fp16:
            setattr(net.opt, name, False)
    if net.load_param(args.param) != 0 or net.load_model(args.param.removesuffix(".param") + ".bin") != 0:
        raise SystemExit(f"count_ncnn: cannot load {args.param}")
    shape = [int(d) for d in args.input_shape.split(",")]
    value = fixed_input(shape, "tensor(float)", args.seed)
    mat = ncnn.Mat(np.ascontiguousarray(value[0]))

    def infer() -> ncnn.Mat:
        ex = net.create_extractor()
        ex.input("in0", mat)
        _, out = ex.extract("out0")
        return out

    out = run_counted(infer, args.warmup, args.repeat)
    if args.logits:
        np.save(args.logits, np.array(out).reshape(1, -1))
    print(json.dumps({"ncnn": ncnn.__version__, "fp16": args.fp16, "threads": 1, "inputs": {"in0": shape}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
