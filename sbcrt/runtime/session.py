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
  model and its feature flags, and the model's bytes (a digest of the whole file: a same-size file with the
  same mtime is not the same model). Each entry's name carries the digest of its own bytes, checked before it
  is loaded; any cache problem costs only speed (see `GraphCache`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import re
import stat
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sbcrt.errors import UsageError
from sbcrt.runtime.atomic import new_temp_file

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
    digest_ms: float = 0.0  # part of load_ms: hashing the model (the cache key) and verifying the cached graph


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


def digest_algorithm(cpu: CpuInfo) -> str:
    """The hash the cache uses on this CPU: SHA-256 where the CPU has SHA instructions (Pi 5's Cortex-A76, x86
    SHA-NI; ~1.4 GB/s on this project's x86 test machine), else BLAKE2b, the faster of the two in software on a
    64-bit core (the Pi 4's Cortex-A72 has no SHA instructions). Either identifies the bytes; the cache key
    records which one made an entry."""
    return "sha256" if {"sha2", "sha_ni"} & set(cpu.features) else "blake2b"


def file_digest(fh: BinaryIO, algorithm: str) -> str:
    """The hex digest of everything left to read in `fh`: 128 bits of `algorithm` (a hashlib name), or the
    8 hex digits of "crc32"."""
    digest = None if algorithm == "crc32" else hashlib.new(algorithm)
    crc = 0
    buffer = bytearray(1 << 20)  # one buffer, reused: reading a 55 MB file into one bytes object costs more
    view = memoryview(buffer)
    while count := fh.readinto(buffer):
        if digest is None:
            crc = zlib.crc32(view[:count], crc)
        else:
            digest.update(view[:count])
    return f"{crc:08x}" if digest is None else digest.hexdigest()[:32]


def cache_key(model_digest: str, cpu: CpuInfo, ort_version: str, algorithm: str = "blake2b") -> str:
    """What an optimised graph was made from: the model's bytes (their digest), the CPU model and its feature
    flags, the onnxruntime version and the optimisation level."""
    identity = "\n".join(
        [ort_version, cpu.machine, cpu.model, " ".join(cpu.features), f"{algorithm}:{model_digest}", "all"]
    )
    return hashlib.blake2b(identity.encode(), digest_size=10).hexdigest()


# A cache entry is "<model stem>-<key>-<crc>.opt.onnx": the key names what the graph was made from (see
# `cache_key`), the CRC-32 is of the entry's own bytes, taken when it was written and checked before each load,
# so a damaged entry (bit rot, a power cut before the data reached the SD card) is removed, never run. It lives
# in the name, so an entry and its check appear together in one rename. CRC-32 is what zip, PNG and ext4 use
# against accidental damage (every burst of up to 32 flipped bits, and all but 1 in 4 billion other damage, is
# caught) at ~3 GB/s, 2-4x cheaper than a cryptographic hash: it guards against accidents, as no check stored
# beside a file could against someone who can write the cache folder (they could write any file it loads).
# The model's identity (the key) is a cryptographic digest: two versions of a model are not accidents.
ENTRY_CHECK = "crc32"
ENTRY_SUFFIX = ".opt.onnx"
ENTRY_NAME = re.compile(r"^(?P<stem>.*)-(?P<key>[0-9a-f]{20})-(?P<digest>[0-9a-f]{8})\.opt\.onnx$", re.DOTALL)
# Left by earlier sbcrt versions, which keyed entries by path and mtime and did not verify them: removed.
LEGACY_ENTRY_NAME = re.compile(r"^.*-[0-9a-f]{20}\.onnx$", re.DOTALL)
PARTIAL_NAME = re.compile(r"^\..*-[0-9a-f]{20}-\w+\.partial$", re.DOTALL)  # any model name (even a newline)
# Eviction, after each new entry is written: the cache stays bounded without any maintenance.
KEEP_PER_MODEL = 2  # entries per model file name (its current version and the one before)
MAX_ENTRIES = 16
MAX_AGE_DAYS = 30  # entries not used for this long (a load marks an entry used)
ORPHAN_AGE_S = 3600  # a .partial this old is left over from a crash, not a start in progress
STEM_CHARS = 80  # keeps entry names well under the 255-byte limit of a file name


class GraphCache:
    """The optimised-graph cache for one model file. Every problem (an unreadable or unwritable folder, a
    damaged entry, a full disk) only costs speed: it is recorded in `note` (one line) and the session is made
    from the model itself. Raises OSError only when the model file cannot be read."""

    def __init__(self, root: Path, model: Path, cpu: CpuInfo, ort_version: str) -> None:
        self.root = root
        self.stem = model.stem[:STEM_CHARS]
        self.model = model
        self.algorithm = digest_algorithm(cpu)
        self.note: str | None = None
        self.usable = True  # False once the folder itself failed: one note is enough
        started = time.perf_counter()
        with open(model, "rb") as fh:
            self.model_stat = os.fstat(fh.fileno())
            # The whole file, not its size and mtime: `cp -p` or a reproducible tar keeps both for new content.
            self.model_digest = file_digest(fh, self.algorithm)
        self.digest_ms = (time.perf_counter() - started) * 1000
        self.key = cache_key(self.model_digest, cpu, ort_version, self.algorithm)
        self.prefix = f"{self.stem}-{self.key}-"

    def _problem(self, text: str) -> None:
        self.note = text if self.note is None else f"{self.note}; {text}"

    def load(self) -> Path | None:
        """The newest entry for this key whose CRC checks out, else None. Damaged entries are removed."""
        try:
            with os.scandir(self.root) as found:
                entries = [
                    (_mtime(entry), Path(entry.path))
                    for entry in found
                    if entry.name.startswith(self.prefix)
                    and ENTRY_NAME.match(entry.name)
                    and entry.is_file(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return None  # nothing cached yet
        except OSError as exc:
            self._problem(f"graph cache off: cannot read {self.root} ({exc.strerror or exc})")
            self.usable = False
            return None
        for _, path in sorted(entries, reverse=True):
            started = time.perf_counter()
            try:
                check = _regular_file_digest(path, ENTRY_CHECK)
            except FileNotFoundError:
                continue  # evicted by a concurrent start
            except OSError as exc:
                self._problem(f"cached graph {path.name} is unreadable ({exc.strerror or exc})")
                continue
            finally:
                self.digest_ms += (time.perf_counter() - started) * 1000
            if check == ENTRY_NAME.match(path.name)["digest"]:
                return path
            self._problem(
                f"cached graph {path.name} is damaged (its bytes do not match the digest taken when it was "
                "written): removed it, optimising the model again"
            )
            self.discard(path)
        return None

    def rejected(self, path: Path, exc: Exception) -> None:
        """A verified entry that onnxruntime still refuses (it cannot happen short of an onnxruntime bug)."""
        self._problem(f"cached graph {path.name} does not load ({type(exc).__name__}): optimising the model again")
        self.discard(path)

    def discard(self, path: Path) -> None:
        # A read-only cache keeps the entry: it is verified (and skipped) again next time.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

    def mark_used(self, path: Path) -> None:
        # Eviction keeps the entries used most recently; a read-only cache still serves its entries.
        with contextlib.suppress(OSError):
            os.utime(path)

    def new_partial(self) -> Path | None:
        """An empty file for onnxruntime to write the optimised graph into, or None when the folder refuses."""
        if not self.usable:
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Written under a unique name and renamed when complete, so a concurrent start or a power cut never
            # leaves a half-written graph under an entry's name.
            fd, path = new_temp_file(self.root, f".{self.prefix}", ".partial")
            os.close(fd)
            return path
        except OSError as exc:
            self._problem(f"graph cache off: {self.root} is not writable ({exc.strerror or exc})")
            return None

    def unsaved(self, partial: Path) -> None:
        """onnxruntime could not write the graph (a full or tiny disk): the session was made without it."""
        partial.unlink(missing_ok=True)
        self._problem(f"graph cache not saved: onnxruntime could not write to {self.root} (is the disk full?)")

    def store(self, partial: Path) -> Path | None:
        """Name the graph onnxruntime wrote to `partial` after its digest; None (and a note) when that fails."""
        try:
            with open(partial, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise OSError("onnxruntime wrote nothing")
                digest = file_digest(fh, ENTRY_CHECK)
            if _identity(os.stat(self.model)) != _identity(self.model_stat):
                raise OSError(f"{self.model} changed while it was loading")
            entry = self.root / f"{self.prefix}{digest}{ENTRY_SUFFIX}"
            os.replace(partial, entry)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            self._problem(f"graph cache not saved: {exc.strerror or exc}")
            return None
        self.evict(keep=entry)
        return entry

    def evict(self, keep: Path) -> None:
        """Remove stale entries: beyond KEEP_PER_MODEL per model name or MAX_ENTRIES in all (least recently
        used first), unused for MAX_AGE_DAYS, from earlier sbcrt versions, and .partial files left by crashes.
        Only names this module makes are touched; errors are ignored (eviction only saves space)."""
        now = time.time()
        try:
            with os.scandir(self.root) as found:
                files = [
                    (_mtime(entry), entry.name)
                    for entry in found
                    if entry.is_file(follow_symlinks=False) and entry.name != keep.name
                ]
        except OSError:
            return
        doomed = []
        per_model = {self.stem: 1}
        kept = 1
        for mtime, name in sorted(files, reverse=True):  # most recently used first
            entry = ENTRY_NAME.match(name)
            if entry:
                stem = entry["stem"]
                if (
                    now - mtime > MAX_AGE_DAYS * 86400
                    or per_model.get(stem, 0) >= KEEP_PER_MODEL
                    or kept >= MAX_ENTRIES
                ):
                    doomed.append(name)
                else:
                    per_model[stem] = per_model.get(stem, 0) + 1
                    kept += 1
            elif LEGACY_ENTRY_NAME.match(name) or (PARTIAL_NAME.match(name) and now - mtime > ORPHAN_AGE_S):
                doomed.append(name)
        for name in doomed:
            with contextlib.suppress(OSError):
                (self.root / name).unlink()


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:  # removed by a concurrent start since the folder was listed: the oldest possible
        return 0.0


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _regular_file_digest(path: Path, algorithm: str) -> str:
    """`file_digest` of a regular file (a symlink or a device under the name, e.g. /dev/zero, is refused)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file_digest(fh, algorithm)


def create_session(
    model_path: str | os.PathLike,
    *,
    threads: int | None = None,
    spin: bool = True,
    cache_dir: str | os.PathLike | None | bool = None,
    providers: list[str] | None = None,
):
    """Open `model_path` as a tuned `onnxruntime.InferenceSession`; returns (session, SessionInfo).

    `cache_dir`: None for the default location (see `default_cache_dir`), False to disable the cache. A cache
    problem never fails the start: the session is then made from the model, with one note in SessionInfo.notes.
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

    def info(cache_path: Path | None, hit: bool) -> SessionInfo:
        if cache is not None and cache.note:
            notes.append(cache.note)
        load_ms = (time.perf_counter() - start) * 1000
        digest_ms = cache.digest_ms if cache is not None else 0.0
        return SessionInfo(chosen, threads, spin, cache_path, hit, load_ms, notes, digest_ms)

    start = time.perf_counter()
    cache_root = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
    cache: GraphCache | None = None
    if cache_root is not None:
        if chosen != [CPU_PROVIDER]:
            notes.append(f"graph cache off: {chosen[0]} compiles its own graph")
        else:
            # OSError: the model cannot be read, and onnxruntime's error below says so.
            with contextlib.suppress(OSError):
                cache = GraphCache(cache_root, path, cpu_info(), ort.__version__)

    if cache is not None and (entry := cache.load()) is not None:
        try:
            # Already optimised: optimising it again would only cost start-up time. Loaded by path, milliseconds
            # after the check (reading it into one bytes object for onnxruntime would cost more than the check).
            session = ort.InferenceSession(
                str(entry), options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=chosen
            )
        except Exception as exc:
            cache.rejected(entry, exc)
        else:
            cache.mark_used(entry)
            return session, info(entry, True)

    opts = options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    partial = cache.new_partial() if cache is not None else None
    if partial is not None:
        opts.optimized_model_filepath = str(partial)
    try:
        session = _open(ort, path, opts, chosen)
    except UsageError:
        if partial is None or cache is None:
            raise
        # onnxruntime fails the whole session when it cannot write the optimised graph (a full or tiny disk):
        # the model itself may be fine, so open it once more without saving; a broken model fails again here.
        partial.unlink(missing_ok=True)
        session = _open(ort, path, options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL), chosen)
        cache.unsaved(partial)
        partial = None
    saved = cache.store(partial) if cache is not None and partial is not None else None
    return session, info(saved, False)


def _open(ort, path: Path, opts, providers: list[str]):
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types with multi-line messages
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        if "protobuf" in first_line.lower() or "INVALID_PROTOBUF" in type(exc).__name__:
            raise UsageError(f"model {path}: not an ONNX model (onnxruntime could not parse it)") from None
        raise UsageError(f"model {path}: onnxruntime cannot load it: {first_line[:300]}") from None
