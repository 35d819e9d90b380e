"""Files that appear whole or not at all (write a temporary file beside the target, then rename it), created
with the user's umask like any other file: `tempfile.mkstemp` makes them 0600 whatever the umask, which a
service user or a container's other uid then cannot read. Kept free of heavy imports (the runtime uses it)."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from sbcrt.errors import SbcrtError, UsageError


def new_temp_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new, empty file in `directory` under a unique name, opened for writing: (fd, path).

    Mode 0666 minus the umask (0644 under the usual 022), as `open()` would make it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(directory))


def write_atomically(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary file and a rename. Raises OSError (nothing left behind)."""
    path = Path(path)
    fd, tmp = new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: Path, *, what: str = "output") -> None:
    """Raise UsageError (one line) unless a file could be written at `path`: checked by creating (and removing)
    a temporary file with one byte in it, in the folder that would hold it (or the nearest existing parent, for a
    folder that does not exist yet). That catches read-only mounts, permissions and completely full disks before
    any long work starts; a disk that fills up meanwhile still fails at the write (see `write_atomically`)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give the file to write")
    if path.exists() and not path.is_file():
        raise UsageError(f"{what} {path} exists and is not a regular file (a device or a socket?)")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: {folder} is not a folder")
    try:
        fd, probe = new_temp_file(folder, ".sbcrt-write-check-", ".tmp")
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())  # a full disk may accept the byte into the page cache and refuse it only here
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None
    finally:
        probe.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> SbcrtError:
    """The one-line error for a failed write of `path`."""
    return SbcrtError(f"cannot write {path}: {exc.strerror or exc}; nothing was written")
