"""Guest side of the instruction counter for the LiteRT peer: like count_inference.py, for a .tflite model.

    python3 count_litert.py MODEL.tflite [--warmup 2] [--repeat 1] [--logits OUT.npy]

Runs under QEMU with the insn_count plugin; benchmarks/arm_count.py --peers litert starts it with the
ai-edge-litert wheel on PYTHONPATH (a folder of its own: LiteRT is a peer we compare against, never part of
sbcrt's userland). 1 thread, LiteRT's default: the interpreter's default op resolver, which hands the graph to
the XNNPACK delegate (fp32 for an fp32 model; XNNPACK's fp16 is opt-in). The counted region is what an
application runs per inference: set the input, invoke, read the output. Saves the logits for the host to check
against onnxruntime's on the same input.
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

NUMPY_TO_ONNX = {np.float32: "tensor(float)", np.uint8: "tensor(uint8)", np.int8: "tensor(int8)"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logits")
    args = parser.parse_args(argv)

    import ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=args.model, num_threads=1)
    interpreter.allocate_tensors()
    (source,) = interpreter.get_input_details()
    (sink,) = interpreter.get_output_details()
    # The same values as onnxruntime's run of the ONNX file (count_inference.fixed_input, NCHW): the converted
    # graph keeps the PyTorch module's NCHW input.
    value = fixed_input([int(d) for d in source["shape"]], NUMPY_TO_ONNX[source["dtype"]], args.seed)

    def infer() -> np.ndarray:
        interpreter.set_tensor(source["index"], value)
        interpreter.invoke()
        return interpreter.get_tensor(sink["index"])

    out = run_counted(infer, args.warmup, args.repeat)
    if args.logits:
        np.save(args.logits, np.asarray(out, np.float32).reshape(1, -1))
    print(
        json.dumps(
            {"ai_edge_litert": ai_edge_litert.__version__, "threads": 1, "inputs": {"x": list(map(int, value.shape))}}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
