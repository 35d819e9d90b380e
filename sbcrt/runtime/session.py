"""An onnxruntime session tuned for small CPUs, with the optimised graph cached on the device.

- Providers: an ARM-accelerated provider (Arm Compute Library, Arm NN) when the installed onnxruntime build has
  one, else the CPU provider (whose MLAS kernels already use NEON on the Pi).
- Threads: one intra-op thread per physical core the process may run on; inter-op parallelism off (the models
  are a single chain of operators).
- Spinning: worker threads busy-wait between operators by default (fastest when inference owns the CPU); turn
  it off when camera or UI threads share the cores, or they lose their time slices to spinning workers.
- Start-up: full graph optimisation takes most of a cold start (layout transforms, fusions). The optimised graph
  is saved once and loaded with optimisation off afterwards. A saved graph holds CPU-specific nodes (NCHWc
  blocked layouts) and only runs where it was made, so the cache key covers the onnxruntime version, the CPU
  model and its feature flags, and the model file (path, size, inode, mtime).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sbcrt.errors import UsageError

# Checked in order; the first one the installed build offers is used, with the CPU provider as the fallback
# for any operator it does not cover.
ARM_PROVIDERS = ("ACLExecutionProvider", "ArmNNExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"

# CPU features that decide which kernels onnxruntime picks; `sbcrt info` shows these (the cache key uses all).
NOTABLE_FEATURES = (
    # arm64: NEON, fp16 arithmetic, int8 dot product, int8 matrix multiply, bf16, SVE
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2",
    # x86-64
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
)  # fmt: skip

# ARM "CPU part" numbers of the cores found on single-board computers.
ARM_CORES = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
}


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # aarch64, x86_64
    model: str  # "Raspberry Pi 4 Model B Rev 1.4 (Cortex-A72)", "AMD EPYC"
    features: tuple[str, ...] = ()

    @property
    def notable_features(self) -> list[str]:
        return [f for f in NOTABLE_FEATURES if f in self.features]


@dataclass
class SessionInfo:
    """How the session was made: what `sbcrt info` reports and what a caller may want to log."""

    providers: list[str]
    threads: int
    spin: bool
    cache_path: Path | None  # the optimised graph on disk, None when caching is off or not possible
    cache_hit: bool  # True when this start loaded the cached graph
    load_ms: float
    notes: list[str] = field(default_factory=list)  # e.g. why the cache was skipped


def cpu_info() -> CpuInfo:
    """The CPU as /proc/cpuinfo (and on a Pi, the device tree) describes it."""
    machine = platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields:  # the first processor describes the others
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    model = fields.get("model name") or fields.get("Model") or _device_tree_model() or platform.processor()
    core = ARM_CORES.get(fields.get("CPU part", "").lower())
    if core and core not in model:
        model = f"{model} ({core})" if model else core
    features = tuple(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return CpuInfo(machine=machine, model=model or machine, features=features)


def _device_tree_model() -> str:
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def physical_cores() -> int:
    """Physical cores this process may use: affinity mask, SMT siblings counted once, cgroup CPU quota."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (some containers): count logical CPUs
    count = max(1, len(cores))
    quota = _cgroup_cpu_limit()
    return min(count, quota) if quota else count


def _cgroup_cpu_limit() -> int | None:
    """A container's CPU quota (cgroup v2 cpu.max), rounded up, or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """The providers to use: `requested` if given (checked), else an ARM-accelerated one if present, + CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise UsageError(
                f"onnxruntime provider {', '.join(missing)} is not in this build (available: {', '.join(available)})"
            )
        return list(requested) if CPU_PROVIDER in requested else [*requested, CPU_PROVIDER]
    accelerated = [p for p in ARM_PROVIDERS if p in available][:1]
    return [*accelerated, CPU_PROVIDER]


def default_cache_dir() -> Path | None:
    """$SBCRT_CACHE (empty or "off" disables the cache), else $XDG_CACHE_HOME/sbcrt, else ~/.cache/sbcrt."""
    configured = os.environ.get("SBCRT_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sbcrt"


def file_identity(path: Path) -> str:
    """The model file's identity for the cache: real path, size, inode and modification time. Hashing the bytes
    instead would cost 40-200 ms per start on a Pi (18-55 MB models), most of what the cache saves; any
    re-export or copy over the file changes its size, inode or mtime."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"


def cache_key(model_identity: str, cpu: CpuInfo, ort_version: str) -> str:
    identity = "\n".join([ort_version, cpu.machine, cpu.model, " ".join(cpu.features), model_identity, "all"])
    return hashlib.blake2b(identity.encode(), digest_size=10).hexdigest()


def create_session(
    model_path: str | os.PathLike,
    *,
    threads: int | None = None,
    spin: bool = True,
    cache_dir: str | os.PathLike | None | bool = None,
    providers: list[str] | None = None,
):
    """Open `model_path` as a tuned `onnxruntime.InferenceSession`; returns (session, SessionInfo).

    `cache_dir`: None for the default location (see `default_cache_dir`), False to disable the cache.
    Raises UsageError with a one-line message when the file is missing or is not a model onnxruntime can run.
    """
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"model {path}: no such file" if not path.exists() else f"model {path}: not a file")
    threads = physical_cores() if threads is None else threads
    if threads < 1:
        raise UsageError(f"threads must be at least 1, not {threads}")
    chosen = choose_providers(providers)
    notes: list[str] = []

    def options(level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not actionable for a user
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return opts

    cache_root = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
    cached: Path | None = None
    if cache_root is not None:
        if chosen != [CPU_PROVIDER]:
            notes.append(f"graph cache off: {chosen[0]} compiles its own graph")
        else:
            key = cache_key(file_identity(path), cpu_info(), ort.__version__)
            cached = cache_root / f"{path.stem}-{key}.onnx"

    start = time.perf_counter()
    if cached is not None and cached.is_file():
        try:
            # The cached graph is already optimised: optimising it again would only cost start-up time.
            session = ort.InferenceSession(
                str(cached), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=chosen
            )
            load_ms = (time.perf_counter() - start) * 1000
            return session, SessionInfo(chosen, threads, spin, cached, True, load_ms, notes)
        except Exception as exc:  # a damaged cache file (power cut, full disk): rebuild it
            notes.append(f"rebuilt the damaged cached graph ({type(exc).__name__})")
            cached.unlink(missing_ok=True)

    opts = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    partial: Path | None = None
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Written under a unique name and renamed when complete, so a concurrent start or a power cut
            # never leaves a half-written graph under the real name.
            fd, name = tempfile.mkstemp(prefix=f".{cached.stem}-", suffix=".partial", dir=cached.parent)
            os.close(fd)
            partial = Path(name)
            opts.optimized_model_filepath = str(partial)
        except OSError as exc:
            notes.append(f"graph cache off: {cache_root} is not writable ({exc.strerror})")
            cached = None
    try:
        session = _open(ort, path, opts, chosen)
    except UsageError:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    load_ms = (time.perf_counter() - start) * 1000
    if partial is not None and cached is not None:
        try:
            if partial.stat().st_size == 0:
                raise OSError("onnxruntime did not write the optimised graph")
            os.replace(partial, cached)
        except OSError as exc:
            notes.append(f"graph cache not saved: {exc}")
            partial.unlink(missing_ok=True)
            cached = None
    return session, SessionInfo(chosen, threads, spin, cached, False, load_ms, notes)


def _open(ort, path: Path, opts, providers: list[str]):
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types with multi-line messages
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if "protobuf" in first_line.lower() or "INVALID_PROTOBUF" in type(exc).__name__:
            raise UsageError(f"model {path}: not an ONNX model (onnxruntime could not parse it)") from None
        raise UsageError(f"model {path}: onnxruntime cannot load it: {first_line[:300]}") from None
