"""`sbcrt export`: weights -> prepared model -> ONNX -> verified against PyTorch -> one self-describing file.

Nothing is written unless every check passes; the file appears atomically (write, then rename).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import torch

from sbcrt import __version__
from sbcrt.errors import SbcrtError, SettingError, UsageError
from sbcrt.export import graph, ncnn_export, quantize
from sbcrt.export.arm_forms import rewrite_depthwise
from sbcrt.export.checkpoint import load_checkpoint, load_weights, num_classes_of
from sbcrt.export.fold import prepare_for_export
from sbcrt.export.random_weights import randomize
from sbcrt.export.rewrite import fold_attention_scale, rewrite_for_inference
from sbcrt.models.registry import Architecture, UnknownArchitecture, WeightsUnavailable, get_architecture
from sbcrt.runtime.atomic import check_writable, write_atomically, write_error
from sbcrt.runtime.engines import ENGINE_NAMES
from sbcrt.runtime.image_files import folder_images
from sbcrt.runtime.metadata import ModelConfig, imagenet_labels, indexed_labels, read_labels_file
from sbcrt.runtime.ncnn_file import companion

# ONNX vs PyTorch: max |difference| of the logits must stay within this fraction of the largest |logit|.
RELATIVE_TOLERANCE = 1e-4
RANDOM_SEEDS = (0, 1)
MAX_VERIFY_IMAGES = 16


@dataclass
class ParityCheck:
    inputs: str
    max_abs_diff: float
    logit_scale: float
    same_top1: bool

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE * self.logit_scale

    @property
    def passed(self) -> bool:
        # Top-1 is reported, not enforced: within the tolerance it can only flip on a near-tie.
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportReport:
    arch: str
    output: Path
    weights: str
    parameters: int
    macs: int
    nodes_raw: int | None  # the exporter's raw translation of the unfolded model (if asked for)
    nodes_final: int
    ops_raw: dict[str, int] | None
    ops_final: dict[str, int]
    folded: dict[str, int]
    parity: list[ParityCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    int8: quantize.Int8Agreement | None = None  # set for an int8 export
    ncnn_output: Path | None = None  # the .ncnn file written beside the ONNX one (--engine ncnn)
    ncnn_parity: list[ParityCheck] = field(default_factory=list)
    ncnn_size_bytes: int = 0
    seconds: float = 0.0
    size_bytes: int = 0

    def render(self) -> str:
        def ops(counts: dict[str, int], names: tuple[str, ...]) -> str:
            return ", ".join(f"{n} {counts.get(n, 0)}" for n in names)

        watched = ("BatchNormalization", "GatherND", "Pad", "LayerNormalization", "HardSigmoid")
        lines = [
            f"exported {self.arch} -> {self.output} ({self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s)",
            f"  weights     {self.weights}",
            f"  parameters  {self.parameters / 1e6:.2f} M    MACs {self.macs / 1e9:.3f} G (224x224, batch 1)",
            f"  folded      {self.folded['batchnorms_folded']} BatchNorms into convolutions, "
            f"{self.folded['attention_tables']} attention bias tables into constants",
        ]
        if self.ops_raw is None:
            lines.append(f"  graph nodes {self.nodes_final}: {ops(self.ops_final, watched)}")
        else:
            lines += [
                f"  graph nodes {self.nodes_raw} raw -> {self.nodes_final} final",
                f"    raw:   {ops(self.ops_raw, watched)}",
                f"    final: {ops(self.ops_final, watched)}",
            ]
        lines.append(
            f"  parity vs PyTorch (max |ONNX - PyTorch| logit, tolerance {RELATIVE_TOLERANCE:g} x logit scale):"
        )
        for check in self.parity:
            verdict = "ok" if check.passed else "FAILED"
            lines.append(
                f"    {check.inputs:<28} {check.max_abs_diff:.2e} <= {check.tolerance:.2e}  "
                f"top-1 {'same' if check.same_top1 else 'DIFFERS'}  {verdict}"
            )
        if self.ncnn_parity:
            lines.append(
                f"  ncnn model -> {self.ncnn_output} ({self.ncnn_size_bytes / 1e6:.1f} MB), parity vs PyTorch "
                "(the runtime's ncnn engine, fp32):"
            )
            for check in self.ncnn_parity:
                verdict = "ok" if check.passed else "FAILED"
                lines.append(
                    f"    {check.inputs:<28} {check.max_abs_diff:.2e} <= {check.tolerance:.2e}  "
                    f"top-1 {'same' if check.same_top1 else 'DIFFERS'}  {verdict}"
                )
        if self.int8 is not None:
            lines.append(f"  int8 (static QDQ, checked fp32 graph above) vs fp32: {self.int8.render()}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def export_model(
    arch: str,
    output: Path,
    *,
    checkpoint: Path | None = None,
    random_init: bool = False,
    labels_path: Path | None = None,
    verify_images: Path | None = None,
    opset: int = 20,
    seed: int = 0,
    raw_graph_stats: bool = True,
    rewrite: bool = True,
    int8: bool = False,
    calib_dir: Path | None = None,
    calib_count: int = 100,
    keep_fp32: list[str] | None = None,
    target: str = "any",
    engine: str = "onnxruntime",
) -> ExportReport:
    """Export `arch` to `output`; raises SbcrtError (and writes nothing) if any check fails.

    `raw_graph_stats` also translates the unfolded model without clean-up, only to report what folding
    removed (node counts); it costs a second export. `rewrite=False` skips the layout rewrites
    (sbcrt/export/rewrite.py), for comparisons: the graph is then the folded authors' structure.
    `int8` writes a statically quantised model instead (sbcrt/export/quantize.py), calibrated on `calib_count`
    photos of `calib_dir`, after the fp32 graph has passed its parity check.
    `target="arm64"` writes depthwise convolutions in the forms onnxruntime's aarch64 kernels run with fewer
    instructions (sbcrt/export/arm_forms.py); they are slower on x86, so the default graph stays CPU-neutral.
    `engine="ncnn"` also writes the .ncnn model beside `output` (sbcrt/export/ncnn_export.py): pnnx's conversion
    of the CPU-neutral fp32 graph, checked against PyTorch with the same bound through the runtime's ncnn engine.
    """
    started = time.perf_counter()
    if opset < 17:
        raise UsageError("opset must be >= 17 (LayerNormalization is one op from opset 17; GELU from 20)")
    try:
        spec = get_architecture(arch)
    except UnknownArchitecture as exc:  # model code knows no runtime: its errors become the user's here
        raise UsageError(str(exc)) from None
    output = Path(output)
    if target not in ("any", "arm64"):
        raise UsageError(f"target must be 'any' or 'arm64', not {target!r}")
    if target == "arm64" and int8:
        raise SettingError(
            "target",
            "arm64 is fp32 only: drop {int8} (the int8 graph already runs onnxruntime's direct kernels)",
            target,
            cites=["int8"],
        )
    if engine not in ENGINE_NAMES:
        raise UsageError(f"engine must be 'onnxruntime' or 'ncnn', not {engine!r}")
    if engine == "ncnn" and int8:
        raise SettingError("engine", "ncnn is fp32 only (its fp16 is a runtime choice: {fp16})", engine, cites=["fp16"])
    if engine == "ncnn":
        ncnn_export.pnnx_executable()  # a missing converter should fail now, not after the export
        ncnn_export.require_ncnn()  # and so should the ncnn the parity check runs it with
        check_writable(companion(output))
    # Before any of the slow work: a read-only or full place should fail now, not after a minute of exporting.
    check_writable(output)
    if int8 and calib_dir is None:
        raise UsageError("int8 needs calibration photos (calib_dir) like the ones the model will see")
    calibration, holdout = quantize.split_photos(calib_dir, calib_count) if int8 else ([], [])

    model, weights_desc, sha256 = _load_model(spec, checkpoint, random_init, seed)
    notes: list[str] = []
    labels = _labels(model.num_classes, labels_path, notes)
    parameters = sum(p.numel() for p in model.parameters())  # unique tensors: aliases count once

    raw = graph.to_onnx(model, spec.data.input_size, opset, optimize=False) if raw_graph_stats else None
    prepared = copy.deepcopy(model)
    folded = prepare_for_export(prepared)
    if rewrite:
        prepared = rewrite_for_inference(prepared)
    final = graph.to_onnx(prepared, spec.data.input_size, opset)
    neutral = final  # the CPU-neutral graph: what ncnn converts (the arm64 forms are for onnxruntime's kernels)
    if target == "arm64":  # a copy: rewrite_depthwise edits its argument, and `neutral` must stay CPU-neutral
        final, forms = rewrite_depthwise(copy.deepcopy(final) if engine == "ncnn" else final)
        done = ", ".join(f"{n} {form}" for form, n in sorted(forms.items())) or "none applied"
        notes.append(f"arm64 depthwise forms: {done}")
    final_ops = graph.op_counts(final)
    if final_ops.get("BatchNormalization"):
        raise SbcrtError("internal error: the exported graph still holds BatchNormalization nodes")

    config = ModelConfig(
        architecture=spec.name,
        num_classes=model.num_classes,
        labels=labels,
        input_size=list(spec.data.input_size),
        resize_size=spec.data.resize_size,
        crop_size=spec.data.crop_size,
        interpolation=spec.data.interpolation,
        mean=list(spec.data.mean),
        std=list(spec.data.std),
        checkpoint_sha256=sha256,
        exporter=f"sbcrt {__version__} (torch {torch.__version__}, onnx {onnx.__version__}, opset {opset})",
        untrained=random_init,
    )
    _set_metadata(final, config)
    _check_graph(final)
    macs = graph.count_macs(final)

    payload = final.SerializeToString()
    if not int8:  # the size is known now: a disk too full for it should fail before the parity checks
        _check_space(output, len(payload))
    parity = _check_parity(model, _onnx_runner(payload), config, verify_images)
    agreement = None
    if int8 and all(c.passed for c in parity):
        config.precision = "int8"
        quantized = quantize.quantize_int8(final, config, calibration, keep_fp32)
        _set_metadata(quantized, config)
        _check_graph(quantized)
        int8_payload = quantized.SerializeToString()
        agreement = quantize.measure_agreement(payload, int8_payload, config, holdout)
        final, payload, final_ops = quantized, int8_payload, graph.op_counts(quantized)
    report = ExportReport(
        arch=spec.name,
        output=output,
        weights=weights_desc,
        parameters=parameters,
        macs=macs,
        nodes_raw=len(raw.graph.node) if raw else None,
        nodes_final=len(final.graph.node),
        ops_raw=dict(graph.op_counts(raw)) if raw else None,
        ops_final=dict(final_ops),
        folded=folded,
        parity=parity,
        notes=notes,
        int8=agreement,
    )
    failed = [c for c in parity if not c.passed]
    if failed:
        raise SbcrtError(
            f"ONNX output differs from PyTorch on {failed[0].inputs}: max |diff| {failed[0].max_abs_diff:.3g} > "
            f"{failed[0].tolerance:.3g}; nothing written.\n{report.render()}"
        )
    if engine == "ncnn":
        ncnn_graph = neutral
        if rewrite and spec.name.startswith("sbcformer"):
            # ncnn runs the attention scale as a layer of its own: its graph has it folded into q's projection.
            folded_scale = fold_attention_scale(copy.deepcopy(prepared))
            ncnn_graph = graph.to_onnx(folded_scale, spec.data.input_size, opset)
        _set_metadata(ncnn_graph, config)
        converted = ncnn_export.convert(ncnn_graph.SerializeToString(), list(spec.data.input_size), config, payload)
        ncnn_payload = converted.to_bytes()
        runner = ncnn_export.engine_for(ncnn_payload, companion(output))
        report.ncnn_output, report.ncnn_size_bytes = companion(output), len(ncnn_payload)
        report.ncnn_parity = _check_parity(model, runner.run, config, verify_images)
        failed = [c for c in report.ncnn_parity if not c.passed]
        if failed:
            raise SbcrtError(
                f"ncnn output differs from PyTorch on {failed[0].inputs}: max |diff| {failed[0].max_abs_diff:.3g} "
                f"> {failed[0].tolerance:.3g}; nothing written.\n{report.render()}"
            )
        # The ONNX file last: a crash in between leaves a .ncnn whose source digest no longer matches, which
        # the runtime refuses by name, never a pair that silently disagrees.
        _write_atomically(companion(output), ncnn_payload)
    _write_atomically(output, payload)
    report.size_bytes = len(payload)
    report.seconds = time.perf_counter() - started
    return report


def _load_model(
    spec: Architecture, checkpoint: Path | None, random_init: bool, seed: int
) -> tuple[torch.nn.Module, str, str]:
    if random_init:
        model = randomize(spec.build(1000), seed)
        return model, f"random (seed {seed}), UNTRAINED: for speed tests only", ""
    if checkpoint is None:
        if spec.default_weights is None:
            raise SettingError(
                "checkpoint",
                f"{spec.name} needs weights: {spec.weights_hint}, or {{random_init}} for speed tests",
                cites=["random_init"],
            )
        try:
            checkpoint = spec.default_weights()
        except WeightsUnavailable as exc:
            raise UsageError(str(exc)) from None
    ckpt = load_checkpoint(checkpoint)
    model = spec.build(num_classes_of(ckpt.state_dict, spec.classifier_key))
    load_weights(model, ckpt.state_dict, spec.name)
    return model.eval(), f"{checkpoint} ({ckpt.layout} layout, sha256 {ckpt.sha256[:12]}…)", ckpt.sha256


def _labels(num_classes: int, labels_path: Path | None, notes: list[str]) -> list[str]:
    if labels_path is not None:
        if not Path(labels_path).is_file():
            raise UsageError(f"labels file not found: {labels_path}")
        labels = read_labels_file(str(labels_path))
        if len(labels) != num_classes:
            raise UsageError(f"{labels_path} has {len(labels)} labels but the model has {num_classes} classes")
        return labels
    if num_classes == 1000:
        return imagenet_labels()
    notes.append(
        f"the model has {num_classes} classes and no labels were given: "
        f"they are named class_0 .. class_{num_classes - 1}"
    )
    return indexed_labels(num_classes)


def _set_metadata(model: onnx.ModelProto, config: ModelConfig) -> None:
    props = config.to_props()
    kept = [p for p in model.metadata_props if p.key not in props and p.key != "features_output"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    # `sbcrt train` reads the pooled features (the classifier's input) by this name instead of guessing.
    head = next((n for n in reversed(model.graph.node) if n.op_type in ("Gemm", "MatMul")), None)
    if head is not None:
        model.metadata_props.add(key="features_output", value=json.dumps(head.input[0]))
    model.producer_name = "sbcrt"
    model.producer_version = __version__
    model.doc_string = f"{config.architecture} exported by sbcrt {__version__}; see metadata_props."


def _check_graph(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SbcrtError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from None


def _verification_photos(extra_dir: Path | None) -> list[Path]:
    samples = resources.files("sbcrt").joinpath("data/samples")
    photos = [Path(str(samples.joinpath(name))) for name in ("chelsea.png", "coffee.png")]
    if extra_dir is not None:
        if not Path(extra_dir).is_dir():
            raise SettingError("verify_images", f"{extra_dir} is not a folder")
        photos += folder_images(Path(extra_dir))[:MAX_VERIFY_IMAGES]
    return photos


def _onnx_runner(payload: bytes):
    """The written bytes in onnxruntime: a function of a batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run([graph.OUTPUT_NAME], {graph.INPUT_NAME: batch})[0]


def _check_parity(model: torch.nn.Module, run, config: ModelConfig, verify_images: Path | None) -> list[ParityCheck]:
    """Run the model as written (`run`, batch -> logits) and the unfolded PyTorch model on the same inputs."""
    from sbcrt.runtime.images import open_image
    from sbcrt.runtime.preprocess import Preprocessing, preprocess_image

    size = tuple(config.input_size)
    batches = []
    for seed in RANDOM_SEEDS:
        generator = np.random.default_rng(seed)
        batches.append((f"random normal (seed {seed})", generator.standard_normal((2, *size), dtype=np.float32)))
    preprocessing = Preprocessing.from_config(config)
    photos = _verification_photos(verify_images)
    pixels = np.concatenate([preprocess_image(open_image(p), preprocessing) for p in photos])
    batches.append((f"{len(photos)} real photos", pixels))

    checks = []
    for name, batch in batches:
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = run(batch)
        checks.append(
            ParityCheck(
                inputs=name,
                max_abs_diff=float(np.max(np.abs(got - expected))),
                logit_scale=float(np.max(np.abs(expected))),
                same_top1=bool(np.array_equal(got.argmax(1), expected.argmax(1))),
            )
        )
    return checks


def _check_space(output: Path, size: int) -> None:
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself will say
    if free < size:
        raise write_error(output, OSError(errno.ENOSPC, f"needs {size / 1e6:.1f} MB, {free / 1e6:.1f} MB free"))


def _write_atomically(output: Path, payload: bytes) -> None:
    """The file appears whole or not at all, with the user's umask (0644 under 022, readable by a service
    user); a failure (the disk filled up meanwhile) is one line."""
    try:
        _check_space(output, len(payload))
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, payload)
    except OSError as exc:
        raise write_error(output, exc) from None
    _remove_leftovers(output)


def _remove_leftovers(output: Path) -> None:
    """Temporary files of earlier exports to the same name that were killed mid-write (older than an hour, so
    never a concurrent export's)."""
    now = time.time()
    prefix = f".{output.name}."
    try:
        with os.scandir(output.parent) as found:
            for entry in found:
                middle = entry.name[len(prefix) : -len(".tmp")]
                if not (
                    entry.name.startswith(prefix) and entry.name.endswith(".tmp") and middle.replace("_", "").isalnum()
                ):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > 3600:
                        os.unlink(entry.path)
    except OSError:
        pass  # only tidying
