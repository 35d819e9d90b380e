#!/usr/bin/env bash
# Run an aarch64 program of the userland (build_userland.sh) under QEMU user-mode emulation, as a given CPU.
#
#   tools/arm64/run.sh --cpu cortex-a72 [--userland DIR] [--qemu-arg ARG]... -- python3 -c 'import sbcrt'
#
# --cpu       a QEMU CPU model with a description in tools/arm64/cpu/ (cortex-a72 = Pi 4, cortex-a76 = Pi 5)
# --userland  default: build/arm64/userland (the last one built)
# --qemu-arg  passed to qemu-aarch64 before the program, e.g. --qemu-arg -plugin --qemu-arg ./libinsn.so
# The program is looked up in the userland's /usr/local/bin and /usr/bin unless it is a path.
#
# Why a per-CPU "view" folder: QEMU serves any absolute path the program opens from its -L prefix when the
# file exists there, else from the host. QEMU 7.2 does not emulate /proc/cpuinfo for aarch64, so without help
# the program reads the host's x86 description and onnxruntime's CPU detection crashes. Each view is the
# userland (by links) plus that CPU's proc/cpuinfo and sys/devices/system/cpu/{possible,present}, so runs as
# different CPUs can share one userland and run at the same time.
#
# QEMU: the dynamically linked qemu-aarch64 (Debian's qemu-user) is preferred because it loads TCG plugins
# (instruction counting); qemu-aarch64-static is used when it is the only one. No binfmt is registered, so
# the program cannot start other aarch64 programs (subprocess of sys.executable fails with ENOEXEC).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cpu=""
userland="${ARM64_BUILD_DIR:-$REPO/build/arm64}/userland"
qemu_args=()
while (($#)); do
    case "$1" in
        --cpu) cpu="$2"; shift 2 ;;
        --userland) userland="$2"; shift 2 ;;
        --qemu-arg) qemu_args+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "run.sh: unknown option $1 (the program goes after --)" >&2; exit 2 ;;
    esac
done
if [[ -z "$cpu" || $# -eq 0 ]]; then
    echo "usage: $0 --cpu cortex-a72|cortex-a76 [--userland DIR] [--qemu-arg ARG]... -- PROGRAM [ARGS...]" >&2
    exit 2
fi
[[ -d "$HERE/cpu/$cpu" ]] || { echo "run.sh: no CPU description $HERE/cpu/$cpu" >&2; exit 2; }
userland="$(cd "$userland" && pwd -P)"
[[ -f "$userland/.complete" ]] || { echo "run.sh: $userland is not a built userland" >&2; exit 2; }

qemu="$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)"
[[ -n "$qemu" ]] || { echo "run.sh: no qemu-aarch64; apt-get install qemu-user" >&2; exit 2; }

view="$userland/views/$cpu"
if [[ ! -e "$view/.complete" ]]; then
    rm -rf "$view"
    mkdir -p "$view"
    for entry in "$userland/rootfs"/*; do
        ln -s "../../rootfs/$(basename "$entry")" "$view/$(basename "$entry")"
    done
    cp -r "$HERE/cpu/$cpu/proc" "$HERE/cpu/$cpu/sys" "$view/"
    touch "$view/.complete"
fi

program="$1"
shift
if [[ "$program" != */* ]]; then
    for dir in usr/local/bin usr/bin; do
        if [[ -e "$view/$dir/$program" ]]; then program="/$dir/$program"; break; fi
    done
fi
[[ "$program" == /* ]] || { echo "run.sh: $program not found in the userland" >&2; exit 2; }

# Children (where binfmt exists) inherit the same prefix and CPU through these.
export QEMU_LD_PREFIX="$view" QEMU_CPU="$cpu"
# An x86 OpenBLAS core type set on the host means nothing to the aarch64 OpenBLAS inside numpy.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
exec "$qemu" -L "$view" -cpu "$cpu" "${qemu_args[@]}" "$view$program" "$@"
