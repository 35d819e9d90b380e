"""Check that a --target install holds exactly the pinned distributions: no more, no fewer, same versions.

    python3 check_closure.py SITE_PACKAGES LOCK_FILE [MORE ...]

pip installs unpinned dependencies without a word; in a lock file that is a bug (the image and the emulated
test userland could then differ from each other or from one day to the next), so it fails here instead.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(paths: list[Path]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            # a lock file's lines: `name==version \`, then its `--hash=...` lines and `# via` comments
            line = line.split("#", 1)[0].strip().rstrip("\\").strip()
            if not line or line.startswith("--hash="):
                continue
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{path}: {line!r} is not pinned with ==")
            pins[canonical(name)] = version.strip()
    return pins


def installed(site: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for meta in site.glob("*.dist-info/METADATA"):
        fields = dict(
            line.split(": ", 1) for line in meta.read_text(errors="replace").splitlines()[:20] if ": " in line
        )
        found[canonical(fields["Name"])] = fields["Version"]
    return found


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    pins = read_pins([Path(p) for p in argv[2:]])
    have = installed(Path(argv[1]))
    problems = [f"{name}=={v} installed but not pinned" for name, v in sorted(have.items()) if name not in pins]
    problems += [f"{name}=={v} pinned but not installed" for name, v in sorted(pins.items()) if name not in have]
    problems += [
        f"{name}: pinned {pins[name]}, installed {have[name]}"
        for name in sorted(pins.keys() & have.keys())
        if pins[name] != have[name]
    ]
    for problem in problems:
        print(f"check_closure: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
