"""Print the image configuration stored in a docker-archive (what `docker load` will see), as JSON.

    python3 tools/image/archive_config.py [--require-healthcheck] build/image/sbcrt-arm64.docker.tar

Reads the archive's manifest.json and the config blob it names, without any container tool, so the check
does not trust podman's own view of what it saved. --require-healthcheck: exit 1 unless the config keeps the
HEALTHCHECK (podman drops it from OCI-format images; this archive must be docker format).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path


def read_config(archive: Path) -> dict:
    """The manifest entry's RepoTags plus the image config JSON of the (single) image in a docker-archive."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        if len(manifest) != 1:
            raise SystemExit(f"{archive}: expected one image, found {len(manifest)}")
        config = json.load(tar.extractfile(manifest[0]["Config"]))
    return {"RepoTags": manifest[0].get("RepoTags"), "Layers": len(manifest[0]["Layers"]), **config}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--require-healthcheck", action="store_true")
    args = parser.parse_args(argv)
    config = read_config(args.archive)
    if args.require_healthcheck and not (config.get("config") or {}).get("Healthcheck"):
        print(f"{args.archive}: the image config has no Healthcheck", file=sys.stderr)
        return 1
    print(json.dumps(config, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
