#!/usr/bin/env bash
# The FROM of Dockerfile.arm64 without a registry: Debian bookworm arm64 "slim" made here with mmdebstrap from
# Debian's own archive, imported into podman's storage as docker.io/library/debian:bookworm-slim (arm64).
#
#   tools/image/base_rootfs.sh        prints the image reference on its last line
#
# What it is made from (this script, the mirrors, and the Date of each suite's InRelease, i.e. the archive's
# state; or DEBIAN_SNAPSHOT=YYYYMMDDTHHMMSSZ for snapshot.debian.org, which never changes) is hashed into a key:
# the rootfs tar is cached as build/image/base/bookworm-slim-arm64-<key>.tar with the package list it holds,
# and the imported image carries the key as a label, so a run with the same archive state does nothing.
# Like Docker's debian:bookworm-slim: minbase, merged /usr, and dpkg excludes for docs, man pages and locales.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD_ROOT="${IMAGE_BUILD_DIR:-$REPO/build/image}"
REFERENCE="docker.io/library/debian:bookworm-slim"
log() { echo "[base_rootfs] $*" >&2; }

if [[ -n "${DEBIAN_SNAPSHOT:-}" ]]; then
    DEBIAN_MIRROR="http://snapshot.debian.org/archive/debian/$DEBIAN_SNAPSHOT"
    DEBIAN_SECURITY_MIRROR="http://snapshot.debian.org/archive/debian-security/$DEBIAN_SNAPSHOT"
fi
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"  # what this machine's own apt uses
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
sources=(
    "deb $DEBIAN_MIRROR bookworm main"
    "deb $DEBIAN_MIRROR bookworm-updates main"
    "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
)

# How the rootfs is made; it goes into the cache key (so does the archive's state, below).
# The slim images' excludes (debuerreotype's): they stay in /etc/dpkg/dpkg.cfg.d/, so the Dockerfile's own
# apt-get installs skip docs and man pages too. The merged-usr hook: without it bookworm pulls in usrmerge
# and with it perl (~150 MB instead of ~100 MB).
recipe=(
    --variant=minbase --architectures=arm64 --format=tar
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/groff/*'
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
    --dpkgopt='path-exclude=/usr/share/linda/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --aptopt='Acquire::Languages "none"'
)

# Docker's debian images also carry this apt configuration (debuerreotype's docker-clean): apt deletes the
# .debs it downloaded and its binary caches after each run, so a Dockerfile's `apt-get install` layer holds
# the installed files only (without it the image's apt layer kept ~80 MB of .debs). Written by the last
# customize hooks, so mmdebstrap's own bootstrap keeps its downloads; its final `apt-get clean` then no
# longer removes pkgcache.bin (the config names none), so a hook does (72 MB).
docker_clean='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";'

# The archive's state: the Date: line of each suite's InRelease (a few kB each). Offline, the newest cached
# rootfs is used as it is.
archive_dates() {
    python3 - "$DEBIAN_MIRROR/dists/bookworm" "$DEBIAN_MIRROR/dists/bookworm-updates" \
        "$DEBIAN_SECURITY_MIRROR/dists/bookworm-security" <<'PY'
import sys
import urllib.request

for suite in sys.argv[1:]:
    with urllib.request.urlopen(f"{suite}/InRelease", timeout=30) as response:
        text = response.read().decode("utf-8", "replace")
    date = next(line for line in text.splitlines() if line.startswith("Date:"))
    print(suite, date)
PY
}

mkdir -p "$BUILD_ROOT/base"
if dates="$(archive_dates 2>/dev/null)"; then
    key="$(printf '%s\n' "${recipe[@]}" "$docker_clean" "rm *.bin" "${sources[@]}" "$dates" | sha256sum | cut -c1-12)"
else
    newest="$(ls -t "$BUILD_ROOT"/base/bookworm-slim-arm64-*.tar 2>/dev/null | head -n1 || true)"
    [[ -n "$newest" ]] || { log "cannot reach $DEBIAN_MIRROR and no cached rootfs"; exit 1; }
    key="$(basename "$newest" .tar)"
    key="${key##*-}"
    log "archive unreachable: using the cached rootfs $newest"
fi
tarball="$BUILD_ROOT/base/bookworm-slim-arm64-$key.tar"

if [[ "$(podman image inspect --format '{{index .Labels "org.sbcrt.base-key"}}' "$REFERENCE" 2>/dev/null)" == "$key" ]]; then
    log "$REFERENCE (arm64) up to date ($key)"
    echo "$REFERENCE"
    exit 0
fi

if [[ ! -f "$tarball" ]]; then
    started=$SECONDS
    printf '%s\n' "$docker_clean" >"$BUILD_ROOT/base/docker-clean"
    log "mmdebstrap: bookworm arm64 minbase from ${sources[0]#deb } ($key)"
    mmdebstrap "${recipe[@]}" \
        --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" >"$1/tmp/packages.lock"' \
        --customize-hook="download /tmp/packages.lock $tarball.packages" \
        --customize-hook='rm -f "$1/tmp/packages.lock"' \
        --customize-hook="upload $BUILD_ROOT/base/docker-clean /etc/apt/apt.conf.d/docker-clean" \
        --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
        bookworm "$tarball.partial" "${sources[@]}" >"$tarball.log" 2>&1 || {
        tail -n 30 "$tarball.log" >&2
        log "mmdebstrap failed (whole log: $tarball.log)"
        exit 1
    }
    mv "$tarball.partial" "$tarball"
    printf '%s\n' "${sources[@]}" "${dates:-}" >"$tarball.sources"
    log "rootfs $(du -h "$tarball" | cut -f1) in $((SECONDS - started)) s"
fi

podman import --quiet --arch arm64 --os linux \
    --change 'CMD ["bash"]' --change "LABEL org.sbcrt.base-key=$key" \
    --message "debian bookworm arm64 slim, mmdebstrap ($key)" "$tarball" "$REFERENCE" >/dev/null
log "imported $REFERENCE (arm64, $key)"
echo "$REFERENCE"
