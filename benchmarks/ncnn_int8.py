"""int8 on a Pi 4, measured (#17 item 4): ncnn's int8 kernels against its fp32 ones, counted under QEMU as a
Cortex-A72 (no dot product) and an A76 (dot product), for a whole model and for one 1x1 convolution.

    python benchmarks/ncnn_int8.py --model sbcformer_b.onnx [--model lite0.onnx] [--cpu cortex-a72]
        [--calib DIR] [--calib-count 32] [--json out.json]

MODEL needs its .ncnn beside it (`sbcrt export ... --engine ncnn`). Its Convolution, ConvolutionDepthWise and
InnerProduct layers are quantised here the way ncnn's own ncnn2int8 does it (symmetric int8; weights per output
channel, activations per tensor from their largest magnitude on --calib photos, `int8_scale_term` in the param,
the scales after each layer's bias in the weights; ncnn quantises the weights as it loads them). ncnn's int8
tools are not on PyPI or in Debian, so this writes the same param and weights itself; it is a measurement, not
something sbcrt ships. Both files are counted with the peers' guest script (tools/arm64/insn_count/
count_ncnn.py, 1 thread, fp32 storage) in the userland of `make test-arm64`, which has the pinned ncnn. The
int8 logits are compared with the fp32 ones on photos the calibration did not see (top-1 agreement, and top-1
against the truth when the model's labels are the photos' classes).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import arm_count  # noqa: E402
from benchmarks.common import BUILD, machine_info, shared_photos  # noqa: E402
from sbcrt.runtime.ncnn_file import NcnnModel, companion  # noqa: E402

QUANTISED = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
# One pointwise convolution of SBCFormer's size class: 256 -> 256 channels at 28x28, 51.4 M multiply-adds.
KERNEL_CHANNELS, KERNEL_SIDE = 256, 28


@dataclass
class Layer:
    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    tokens: list[str]
    params: dict[int, str]
    weights: list[tuple[int, int]] = field(default_factory=list)  # (start, end) in the .bin, in load order


def read_layers(param: str, weights: bytes) -> tuple[list[str], list[Layer]]:
    """The param's header lines and its layers, each with the byte ranges of the .bin it loads."""
    lines = param.splitlines()
    layers, offset = [], 0
    for line in lines[2:]:
        fields = line.split()
        kind, name, n_bottom, n_top = fields[0], fields[1], int(fields[2]), int(fields[3])
        tokens = fields[4 + n_bottom + n_top :]
        params = {}
        for token in tokens:
            key, value = token.split("=", 1)
            params[int(key) if int(key) > -23300 else -23300 - int(key)] = value
        layer = Layer(kind, name, fields[4 : 4 + n_bottom], fields[4 + n_bottom : 4 + n_bottom + n_top], tokens, params)
        offset = _claim_weights(layer, weights, offset)
        layers.append(layer)
    if offset != len(weights):
        raise SystemExit(f"ncnn_int8: the layers load {offset} bytes of a {len(weights)}-byte .bin")
    return lines[:2], layers


def _claim_weights(layer: Layer, weights: bytes, offset: int) -> int:
    """What ncnn's load_model reads for the layer kinds pnnx writes (fp32, fp16=0)."""
    p = layer.params

    def tagged(count: int) -> None:  # a 4-byte type tag (0: raw fp32), then the values
        nonlocal offset
        (tag,) = struct.unpack_from("<I", weights, offset)
        if tag != 0:
            raise SystemExit(f"ncnn_int8: {layer.name}'s weights are not raw fp32 (tag {tag:#x})")
        layer.weights.append((offset, offset + 4 + 4 * count))
        offset += 4 + 4 * count

    def raw(count: int) -> None:
        nonlocal offset
        layer.weights.append((offset, offset + 4 * count))
        offset += 4 * count

    if layer.kind in ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise"):
        tagged(int(p.get(6, 0)))
        if int(p.get(5, 0)):
            raw(int(p[0]))
    elif layer.kind == "InnerProduct":
        tagged(int(p.get(2, 0)))
        if int(p.get(1, 0)):
            raw(int(p[0]))
    elif layer.kind == "LayerNorm" and int(p.get(2, 1)):
        raw(2 * int(p[0]))
    elif layer.kind == "MemoryData":
        raw(int(np.prod([max(1, int(p.get(k, 0))) for k in (0, 1, 11, 2)])))
    return offset


def quantise(param: str, weights: bytes, input_scales: dict[str, float]) -> tuple[str, bytes]:
    """ncnn2int8's layout: int8_scale_term 2 (Convolution, InnerProduct: per-channel weight scales) or 1
    (ConvolutionDepthWise: per-group), then the weight scales and the input blob's scale after the bias."""
    header, layers = read_layers(param, weights)
    lines, out = list(header), bytearray()
    for layer in layers:
        tokens = layer.tokens
        data = b"".join(weights[s:e] for s, e in layer.weights)
        if layer.kind in QUANTISED:
            start, end = layer.weights[0]
            values = np.frombuffer(weights[start + 4 : end], np.float32)
            depthwise = layer.kind == "ConvolutionDepthWise"
            rows = int(layer.params.get(7, 1)) if depthwise else int(layer.params[0])
            largest = np.abs(values.reshape(rows, -1)).max(axis=1)
            scales = np.where(largest > 0, 127.0 / np.maximum(largest, 1e-30), 1.0).astype(np.float32)
            data += scales.tobytes() + np.float32(input_scales[layer.bottoms[0]]).tobytes()
            tokens = [t for t in tokens if not t.startswith("8=")] + [f"8={1 if depthwise else 2}"]
        out += data
        counts = [str(len(layer.bottoms)), str(len(layer.tops))]
        lines.append(" ".join([layer.kind, layer.name, *counts, *layer.bottoms, *layer.tops, *tokens]))
    return "\n".join(lines) + "\n", bytes(out)


def load_net(model: NcnnModel, param: str, weights: bytes):
    """`model` with this param and weights, loaded as the ncnn engine loads it (fp32), on every core."""
    from sbcrt.runtime.engines.ncnn import load_net as engine_net

    variant = replace(model, param=param.encode(), weights=weights)
    return engine_net(variant, Path("the int8 variant"), threads=os.cpu_count() or 1, spin=True, fp16=False)


def blob_values(net, input_name: str, tensor: np.ndarray, blobs: list[str]) -> dict[str, np.ndarray]:
    import ncnn

    extractor = net.create_extractor()
    extractor.set_light_mode(False)  # keep every blob: several are read from one pass
    mat = ncnn.Mat(np.ascontiguousarray(tensor[0], np.float32))
    extractor.input(input_name, mat)
    return {blob: np.array(extractor.extract(blob)[1]) for blob in blobs}


def top1(net, model, tensor: np.ndarray) -> int:
    return int(blob_values(net, model.input_name, tensor, [model.output_name])[model.output_name].argmax())


def count(counter: arm_count.Counter, cpu: str, param: Path, shape: list[int]) -> dict:
    regions = param.with_suffix(".regions.jsonl")
    regions.unlink(missing_ok=True)
    guest = [str(arm_count.COUNTER_SOURCES / "count_ncnn.py"), str(param), "--input-shape", ",".join(map(str, shape))]
    command = counter.command(cpu, regions, [*guest, "--warmup", "2", "--repeat", "1"])
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    (region,) = [json.loads(line) for line in regions.read_text().splitlines()]
    regions.unlink()
    return {"instructions": region["instructions"], "classes": region["classes"]}


def kernel_pair(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """One 1x1 convolution in fp32 and in int8 (random weights: the kernels do not depend on the values)."""
    c, side = KERNEL_CHANNELS, KERNEL_SIDE
    weights = np.random.default_rng(0).standard_normal((c, c)).astype(np.float32) * 0.05
    fp32 = struct.pack("<I", 0) + weights.tobytes() + np.zeros(c, np.float32).tobytes()
    layer = f"Convolution conv 1 1 in0 out0 0={c} 1=1 5=1 6={c * c}"
    files = {}
    for name, extra, data in (
        ("kernel.fp32", "", fp32),
        (
            "kernel.int8",
            " 8=2",
            fp32 + (127 / np.abs(weights).max(1)).astype(np.float32).tobytes() + struct.pack("<f", 32.0),
        ),
    ):
        path = folder / f"{name}.param"
        path.write_text(f"7767517\n2 2\nInput in0 0 1 in0 0={side} 1={side} 2={c}\n{layer}{extra}\n")
        path.with_suffix(".bin").write_bytes(data)
        files[name] = (path, [1, c, side, side])
    return files


def main(argv: list[str] | None = None) -> int:
    from sbcrt.runtime.classifier import Classifier
    from sbcrt.runtime.evaluation import find_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--cpu", action="append", help="default: cortex-a72 and cortex-a76")
    parser.add_argument("--calib", type=Path, default=shared_photos())
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpus = args.cpu or ["cortex-a72", "cortex-a76"]
    folder = BUILD / "ncnn-int8"
    folder.mkdir(parents=True, exist_ok=True)
    counter = arm_count.Counter.prepare()

    files = kernel_pair(folder)
    report: dict = {"machine": machine_info(), "calib_count": args.calib_count, "models": {}}
    for model_path in args.model:
        model = NcnnModel.read(companion(model_path))
        param, weights = model.param.decode(), model.weights
        classifier = Classifier(model_path, engine="ncnn", warmup=False)
        dataset = find_dataset(args.calib, classifier.labels)
        images = list(dataset.images)
        calibration = images[:: max(1, len(images) // args.calib_count)][: args.calib_count]
        calibrated = {image.path for image in calibration}
        holdout = [image for image in images if image.path not in calibrated]
        _, layers = read_layers(param, weights)
        blobs = sorted({layer.bottoms[0] for layer in layers if layer.kind in QUANTISED})
        fp32_net = load_net(model, param, weights)
        largest = dict.fromkeys(blobs, 0.0)
        for image in calibration:
            values = blob_values(fp32_net, model.input_name, classifier.preprocess(image.path), blobs)
            for blob in blobs:
                largest[blob] = max(largest[blob], float(np.abs(values[blob]).max()))
        scales = {blob: 127.0 / value if value > 0 else 1.0 for blob, value in largest.items()}
        int8_param, int8_weights = quantise(param, weights, scales)
        int8_net = load_net(model, int8_param, int8_weights)
        agree = right32 = right8 = 0
        for image in holdout:
            tensor = classifier.preprocess(image.path)
            top32, top8 = (top1(net, model, tensor) for net in (fp32_net, int8_net))
            agree += top32 == top8
            right32 += top32 == image.label
            right8 += top8 == image.label
        stem = model_path.stem
        for name, (text, data) in {
            f"{stem}.fp32": (param, weights),
            f"{stem}.int8": (int8_param, int8_weights),
        }.items():
            (folder / f"{name}.param").write_text(text)
            (folder / f"{name}.bin").write_bytes(data)
            files[name] = (folder / f"{name}.param", list(model.input_shape))
        report["models"][stem] = {
            "holdout": len(holdout),
            "top1_agreement": agree / len(holdout),
            "top1_fp32": right32 / len(holdout),
            "top1_int8": right8 / len(holdout),
            "untrained": classifier.describe().get("untrained", False),
        }
        del fp32_net, int8_net

    counts = {name: {cpu: count(counter, cpu, path, shape) for cpu in cpus} for name, (path, shape) in files.items()}
    report["counts"] = counts
    print(f"{'model':<28}{'CPU':<12}{'fp32 M':>9}{'int8 M':>9}{'int8/fp32':>11}")
    for stem in ["kernel", *(p.stem for p in args.model)]:
        for cpu in cpus:
            fp32, int8 = counts[f"{stem}.fp32"][cpu]["instructions"], counts[f"{stem}.int8"][cpu]["instructions"]
            print(f"{stem:<28}{cpu:<12}{fp32 / 1e6:>9.1f}{int8 / 1e6:>9.1f}{int8 / fp32:>10.3f}x")
    for stem, accuracy in report["models"].items():
        print(
            f"{stem}: {accuracy['holdout']} photos not calibrated on: top-1 agreement int8/fp32 "
            f"{100 * accuracy['top1_agreement']:.1f} %, top-1 fp32 {100 * accuracy['top1_fp32']:.1f} %, "
            f"int8 {100 * accuracy['top1_int8']:.1f} %"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
