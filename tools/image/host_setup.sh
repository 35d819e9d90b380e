#!/usr/bin/env bash
# Prepare this machine to build and run the arm64 image without a Docker daemon or a registry (run as root):
# Debian's podman/buildah/mmdebstrap/qemu-user-static, a containers.conf podman can work with here, and
# binfmt_misc with qemu-aarch64 so the image's RUN steps and containers execute aarch64 programs.
# Idempotent: each step checks first and does nothing when it is already in place.
set -euo pipefail

log() { echo "[image host] $*" >&2; }

# -- 1. packages -----------------------------------------------------------------------------------------
# catatonit: the init of `podman run --init` (a crashed emulated PID 1 otherwise hangs the container).
# uidmap/fuse-overlayfs/slirp4netns: what podman's Debian package recommends and rootless use needs.
packages=(podman buildah mmdebstrap qemu-user-static binfmt-support arch-test runc catatonit uidmap
    fuse-overlayfs slirp4netns debian-archive-keyring ca-certificates)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- 2. containers.conf ----------------------------------------------------------------------------------
# Measured in this sandbox (issue 15): crun fails ("cgroups in hybrid mode not supported"), systemd is not
# PID 1 (no systemd cgroup manager, no journald), and without CAP_SYS_RESOURCE podman's default ulimits
# cannot be set ("setrlimit RLIMIT_NOFILE: Operation not permitted"). A file that already chose a runtime
# and a cgroup manager is the machine owner's: it is left alone.
conf=/etc/containers/containers.conf
if [[ -f "$conf" ]] && grep -Eq '^\s*runtime\s*=' "$conf" && grep -Eq '^\s*cgroup_manager\s*=' "$conf"; then
    log "$conf already sets a runtime and a cgroup manager: left as it is"
else
    [[ -f "$conf" ]] && cp "$conf" "$conf.before-sbcrt" && log "kept the previous $conf as $conf.before-sbcrt"
    mkdir -p /etc/containers
    cat >"$conf" <<'CONF'
# Written by sbcrt's tools/image/host_setup.sh (issue 15): what podman needs in a container sandbox without
# systemd, with hybrid cgroups and without CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    log "wrote $conf"
fi

# -- 3. binfmt_misc: the kernel hands aarch64 ELF files to qemu-aarch64-static ------------------------------
# Debian registers it with the F flag (the interpreter is opened once, at registration), so it works inside
# containers whose root has no qemu; QEMU_CPU in a container's environment still reaches it (it reads env).
if [[ ! -e /proc/sys/fs/binfmt_misc/register ]]; then
    log "mounting binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [[ "$(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" != enabled ]]; then
    log "enabling qemu-aarch64 in binfmt_misc"
    update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
    update-binfmts --enable qemu-aarch64
fi
arch-test arm64 >/dev/null || { log "arch-test: this machine still cannot run arm64 programs"; exit 1; }
log "ready: $(podman --version), $(qemu-aarch64-static --version | head -n1), binfmt qemu-aarch64 enabled"
