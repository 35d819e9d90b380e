#!/usr/bin/env bash
# Build an arm64 (aarch64) Debian bookworm + Python 3.11 userland with the pinned runtime wheels, for running
# under QEMU user-mode emulation on an x86 machine: the software a 64-bit Raspberry Pi OS (bookworm) runs.
#
#   tools/arm64/build_userland.sh [--with-tests]     prints the userland's directory on its last line
#
# Nothing on the host changes: a private APT configuration (architecture arm64, its own state and cache under
# build/arm64/) downloads the .debs, which are unpacked with dpkg-deb (no maintainer scripts, no chroot, no
# binfmt); the host's pip installs the aarch64 wheels of exactly the pinned versions with --platform/--target.
# The result is cached under build/arm64/userland-<key>, the key hashing everything that goes into it (this
# script, the package list, the requirements files), so a second run with the same pins returns at once.
# --with-tests adds tools/arm64/requirements-test.txt (pytest, onnx) to the same userland.
# The userland is reusable by anything that wants to run aarch64 Python here (see run.sh).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD_ROOT="${ARM64_BUILD_DIR:-$REPO/build/arm64}"
# Debian's own archive by default; override to use a local mirror or a snapshot.
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PIP="${PIP:-$REPO/.venv/bin/pip}"

with_tests=0
case "${1:-}" in
    --with-tests) with_tests=1 ;;
    "") ;;
    *) echo "usage: $0 [--with-tests]" >&2; exit 2 ;;
esac

inputs=("$HERE/build_userland.sh" "$HERE/debian-packages.txt" "$REPO/requirements-runtime.txt" "$REPO/requirements-ncnn.txt")
requirements=(-r "$REPO/requirements-runtime.txt")
if ((with_tests)); then
    inputs+=("$HERE/requirements-test.txt")
    requirements+=(-r "$HERE/requirements-test.txt")
fi
key="$(cat "${inputs[@]}" | sha256sum | cut -c1-12)"
userland="$BUILD_ROOT/userland-$key"
if [[ -f "$userland/.complete" ]]; then
    echo "arm64 userland up to date" >&2
    echo "$userland"
    exit 0
fi

log() { echo "[build_userland] $*" >&2; }
started=$SECONDS
rm -rf "$userland"
rootfs="$userland/rootfs"
apt_dir="$BUILD_ROOT/apt"  # shared by all keys: the .deb cache survives a change of Python pins
mkdir -p "$rootfs" "$apt_dir"/{state/lists/partial,cache/archives/partial,etc/preferences.d,etc/apt.conf.d}

# -- 1. Debian packages ------------------------------------------------------------------------------------
# An empty dpkg status makes APT download the whole dependency closure, as on an empty system.
: >"$apt_dir/state/status"
cat >"$apt_dir/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR bookworm main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR bookworm-updates main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_SECURITY_MIRROR bookworm-security main
EOF
apt_options=(
    -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
    -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status"
    -o "Dir::Cache=$apt_dir/cache" -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
    -o "Dir::Etc::SourceParts=-" -o "Dir::Etc::Preferences=-" -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
    -o "Dir::Etc::Parts=$apt_dir/etc/apt.conf.d"
    -o "Acquire::Languages=none" -o "Debug::NoLocking=1" -o "APT::Install-Recommends=0"
    -o "APT::Sandbox::User=root"
)
mapfile -t packages < <(grep -v '^\s*#' "$HERE/debian-packages.txt" | grep -v '^\s*$')
log "apt: ${packages[*]} (arm64) and their dependencies"
apt-get "${apt_options[@]}" -qq update
# --download-only with a private status never runs dpkg; the .debs land in our cache.
apt-get "${apt_options[@]}" -qq -y --download-only install "${packages[@]}" >/dev/null
# Record which versions went in (the same resolution Dockerfile.arm64's apt-get makes on the same day).
apt-get "${apt_options[@]}" -s install "${packages[@]}" | awk '/^Inst /{print $2, $3}' | tr -d '(' |
    sort >"$userland/debian-packages.lock"

# Merged /usr, as bookworm has it: /bin, /lib, /sbin are links into /usr. --keep-directory-symlink stops tar
# from replacing these links with real folders when a package ships files under /lib.
mkdir -p "$rootfs/usr/bin" "$rootfs/usr/lib" "$rootfs/usr/sbin"
for dir in bin lib sbin; do ln -s "usr/$dir" "$rootfs/$dir"; done
while read -r name version; do
    deb="$(ls "$apt_dir/cache/archives/${name}_"*"_"{arm64,all}.deb 2>/dev/null | head -n1 || true)"
    [[ -n "$deb" ]] || { log "missing .deb for $name $version"; exit 1; }
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$rootfs"
done <"$userland/debian-packages.lock"
# QEMU resolves a path inside the prefix with the host's own lookups, so an absolute link such as
# /usr/bin/python3 -> /usr/bin/python3.11 would point out of the userland: make every link relative.
find "$rootfs" -type l -lname '/*' -print0 | while IFS= read -r -d '' link; do
    target="$(readlink "$link")"
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$rootfs$target")" "$link"
done
ln -sfn python3.11 "$rootfs/usr/bin/python3"
ln -sfn python3.11 "$rootfs/usr/bin/python"

# -- 2. Wheels: exactly the pinned versions, aarch64 builds for CPython 3.11 ------------------------------
site="$rootfs/usr/local/lib/python3.11/dist-packages"  # on Debian Python's sys.path, as on the Pi
platforms=()
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done  # glibc <= 2.36
platforms+=(--platform manylinux2014_aarch64 --platform linux_aarch64)
log "pip: aarch64 wheels pinned in $(printf '%s ' "${requirements[@]}" | sed "s|-r ||g; s|$REPO/||g")"
"$PIP" install --quiet --disable-pip-version-check --no-compile --target "$site" --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
    "${requirements[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The ncnn engine without its declared dependencies (see requirements-ncnn.txt: they serve only ncnn.model_zoo).
"$PIP" install --quiet --disable-pip-version-check --no-compile --target "$site" --only-binary=:all: --no-deps \
    --implementation cp --python-version 3.11 --abi cp311 "${platforms[@]}" -r "$REPO/requirements-ncnn.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The requirements files must be a closed set: anything pip added on its own is an unpinned dependency.
python3 "$HERE/check_closure.py" "$site" "$REPO/requirements-runtime.txt" "$REPO/requirements-ncnn.txt" \
    $( ((with_tests)) && echo "$HERE/requirements-test.txt")

# Debian's .debs carry no bytecode (dpkg's postinst compiles it) and every emulated start would otherwise
# compile the stdlib again, 200x slower than here: compile with the host's Python 3.11 (same bytecode format).
host_python="$(dirname "$PIP")/python"
if [[ "$("$host_python" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" == True ]]; then
    for dir in usr/lib/python3.11 usr/local/lib/python3.11/dist-packages; do
        "$host_python" -m compileall -q -j0 -d "/$dir" "$rootfs/$dir" >/dev/null ||
            log "some files in /$dir did not compile (they are compiled on first import instead)"
    done
fi

touch "$userland/.complete"
ln -sfn "$(basename "$userland")" "$BUILD_ROOT/userland"
log "built $userland ($(du -sh "$userland" | cut -f1), $((SECONDS - started)) s)"
echo "$userland"
