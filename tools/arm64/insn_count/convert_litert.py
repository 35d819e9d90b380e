"""Host side of the LiteRT peer: converts one of sbcrt's architectures, as a PyTorch module with the weights
sbcrt's ONNX export used, to a LiteRT (.tflite) flatbuffer with litert-torch (no TensorFlow).

    python convert_litert.py ARCH OUT.tflite (--seed N | --checkpoint FILE) [--input-size 3,224,224]

Runs in the converter's own venv (benchmarks/arm_count.py --peers litert makes it under build/arm64/peers/),
never in sbcrt's: litert-torch brings jax, transformers and a torch of its choosing. The repo is on PYTHONPATH
for sbcrt.models and the seeded initialisation, which only need torch. fp32, batch 1, NCHW input as the
PyTorch module takes it (litert-torch turns the layout into NHWC inside the graph).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch")
    parser.add_argument("out", type=Path)
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--seed", type=int, help="sbcrt's seeded random weights (export --random-init)")
    weights.add_argument("--checkpoint", type=Path, help="a checkpoint sbcrt's export can load")
    parser.add_argument("--input-size", default="3,224,224")
    args = parser.parse_args(argv)

    import litert_torch
    import torch

    from sbcrt.export.checkpoint import load_checkpoint, load_weights, num_classes_of
    from sbcrt.export.random_weights import randomize
    from sbcrt.models.registry import get_architecture

    spec = get_architecture(args.arch)
    if args.seed is not None:
        model = randomize(spec.build(1000), args.seed)
    else:
        checkpoint = load_checkpoint(args.checkpoint)
        model = spec.build(num_classes_of(checkpoint.state_dict, spec.classifier_key))
        load_weights(model, checkpoint.state_dict, spec.name)
    model.eval()
    size = [int(d) for d in args.input_size.split(",")]
    sample = (torch.zeros(1, *size),)
    with torch.no_grad():
        edge = litert_torch.convert(model, sample)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(args.out))
    print(json.dumps({"litert_torch": getattr(litert_torch, "__version__", "?"), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
