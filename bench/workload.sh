#!/usr/bin/env bash
# The real-workload benchmark: zlib's own build and test suite (`./configure && make &&
# make test`, from Debian's source package) compiled and run inside the guest with the
# image's gcc, in a VM (`mode = "system"`) and under qemu-user (`mode = "user"`), each
# against its floor:
#   system floor: the same commands timed by the guest's own clock inside the VM (what is
#                 left when VM start, copying the workspace in and stopping are taken away);
#   user floor:   the same commands run by a bare bubblewrap + qemu-user command on the
#                 image's unpacked root, without runner.
# Whole-process wall times, RUNS paired runs of each, min/median/max.
#
# Usage: bench/workload.sh [ARCH] [RUNS]     (default riscv64 3)
# Needs: the debian-13-dev image for ARCH (built on first use: `runner images build --arch
# ARCH debian-13-dev` in bench/workload/; several minutes under TCG), a release build
# (`cargo build --release`), network to deb.debian.org for the source (cached afterwards).
set -euo pipefail

arch=${1:-riscv64}
runs=${2:-3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
runner=${RUNNER:-$root/target/release/runner}
[ -x "$runner" ] || { echo "workload: build runner first: cargo build --release" >&2; exit 2; }
cache=${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
project="$work/project"
# zlib 1.3.1 as Debian 13 ships it, one suite per mode (zlib-system, zlib-user).
"$here/workload/project.sh" "$project" system user
workload=$(cat "$project/workload.sh")

# The user-mode floor: the image's root as /, a fresh copy of the source as /workspace.
find_sysroot() {
  for d in "$cache"/sysroots/debian-13-dev-"$arch"-*/root; do [ -d "$d" ] && echo "$d" && return; done
}

stats() { sort -n | awk '{a[NR]=$1} END {printf "min %.1f  median %.1f  max %.1f", a[1], a[int((NR+1)/2)], a[NR]}'; }

sys_runner=() sys_guest=() user_runner=() user_floor=()
for i in $(seq "$runs"); do
  for mode in system user; do
    rm -rf "$project/runner-out"
    t0=$(date +%s.%N)
    out=$(cd "$project" && "$runner" test -q --arch "$arch" --suite "zlib-$mode" 2>&1) ||
      { echo "$out" >&2; echo "workload: the $mode run failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    wall=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
    guest=$(echo "$out" | sed -n 's/.*workload-seconds \([0-9.]*\).*/\1/p' | tail -n1)
    if [ "$mode" = system ]; then sys_runner+=("$wall"); sys_guest+=("$guest");
    else user_runner+=("$wall"); fi
    echo "run $i $mode: runner ${wall}s (in the guest ${guest}s)"
  done
  sysroot=$(find_sysroot)
  ws="$work/floor-ws"
  rm -rf "$ws" && mkdir -p "$ws" && cp -a "$project/src" "$ws/src"
  t0=$(date +%s.%N)
  bwrap --unshare-pid --unshare-net --die-with-parent --ro-bind "$sysroot" / --dev /dev \
    --proc /proc --tmpfs /tmp --tmpfs /run --bind "$ws" /workspace --chdir /workspace \
    --clearenv --setenv PATH /usr/sbin:/usr/bin:/sbin:/bin --setenv HOME /tmp \
    /bin/sh -e -c "$workload" >/dev/null
  t1=$(date +%s.%N)
  floor=$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}')
  user_floor+=("$floor")
  echo "run $i user floor (bare bwrap + qemu-user): ${floor}s"
done

echo
echo "zlib make test on $arch, $runs runs (seconds):"
echo "  system mode, runner test:        $(printf '%s\n' "${sys_runner[@]}" | stats)"
echo "  system mode, in the guest:       $(printf '%s\n' "${sys_guest[@]}" | stats)"
echo "  user mode, runner test:          $(printf '%s\n' "${user_runner[@]}" | stats)"
echo "  user mode, bare qemu-user floor: $(printf '%s\n' "${user_floor[@]}" | stats)"
