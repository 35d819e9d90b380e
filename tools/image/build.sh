#!/usr/bin/env bash
# Build the arm64 image from Dockerfile.arm64 (unchanged: the same file `docker buildx` builds) with podman,
# daemonless and without a registry, and save it as a docker-archive a Raspberry Pi can `docker load`:
#
#   tools/image/build.sh        -> image localhost/sbcrt:arm64, build/image/sbcrt-arm64.docker.tar
#
# Needs tools/image/host_setup.sh first (podman, qemu binfmt; `make image-arm64` runs it). The base image comes
# from tools/image/base_rootfs.sh. Idempotent: podman's layer cache makes an unchanged rebuild take seconds, and
# the archive is written again only when the image ID changed.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD_ROOT="${IMAGE_BUILD_DIR:-$REPO/build/image}"
IMAGE="${SBCRT_IMAGE:-localhost/sbcrt:arm64}"
ARCHIVE="$BUILD_ROOT/sbcrt-arm64.docker.tar"
ARCHIVE_TAG="docker.io/library/sbcrt:arm64"
# pip inside the build verifies the package index against the host's CA bundle (this machine may reach PyPI
# through its own CA): mounted read-only for the RUN steps with a pip.conf naming it. Build volumes are in no
# layer. Not over /etc/ssl/certs/ca-certificates.crt: the build stage's ca-certificates package rewrites that
# file in its postinst, which fails on a read-only mount.
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
log() { echo "[image build] $*" >&2; }
started=$SECONDS

mkdir -p "$BUILD_ROOT"
pip_conf="$BUILD_ROOT/pip-build.conf"
printf '[global]\ncert = /etc/sbcrt-build-ca.crt\n' >"$pip_conf"
"$HERE/base_rootfs.sh" >/dev/null

# --format docker: the OCI image format has no HEALTHCHECK or SHELL, and podman would drop both.
# --pull=never: FROM debian:bookworm-slim is the imported base, never a registry's.
# --layers (podman's default): each step is cached, keyed by its inputs, as docker's builder does.
log "podman build -f Dockerfile.arm64 --platform linux/arm64 -> $IMAGE"
podman build --format docker --platform linux/arm64 --pull=never --layers \
    --volume "$CA_BUNDLE:/etc/sbcrt-build-ca.crt:ro" --volume "$pip_conf:/etc/pip.conf:ro" \
    -f "$REPO/Dockerfile.arm64" -t "$IMAGE" "$REPO" >&2

[[ "$(podman image inspect --format '{{.Architecture}}' "$IMAGE")" == arm64 ]] || {
    log "$IMAGE is not an arm64 image"
    exit 1
}
healthcheck="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"
[[ "$healthcheck" == *sbcrt-healthcheck* ]] || { log "$IMAGE lost its HEALTHCHECK: $healthcheck"; exit 1; }

id="$(podman image inspect --format '{{.Id}}' "$IMAGE")"
if [[ ! -f "$ARCHIVE" || "$(cat "$ARCHIVE.id" 2>/dev/null)" != "$id" ]]; then
    rm -f "$ARCHIVE" "$ARCHIVE.id"
    # docker-archive (docker's own `docker save` layout): `docker load` on the Pi reads it, HEALTHCHECK included.
    # Saved under Docker Hub's namespace, so `docker load` on the Pi names it sbcrt:arm64 (podman's own name for
    # a local build, localhost/sbcrt:arm64, would stay localhost/... in Docker).
    podman tag "$IMAGE" "$ARCHIVE_TAG"
    podman save --quiet --format docker-archive -o "$ARCHIVE.partial" "$ARCHIVE_TAG"
    python3 "$HERE/archive_config.py" --require-healthcheck "$ARCHIVE.partial" >/dev/null
    mv "$ARCHIVE.partial" "$ARCHIVE"
    echo "$id" >"$ARCHIVE.id"
fi
size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
log "$IMAGE: $((size / 1000000)) MB on disk; $ARCHIVE $(($(stat -c %s "$ARCHIVE") / 1000000)) MB" \
    "($((SECONDS - started)) s)"
