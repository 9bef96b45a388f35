#!/usr/bin/env bash
# TCG tuning on the real workload: the zlib build + `make test` of bench/workload.sh, system
# mode only, run by two runner binaries in turn (paired: A, B, A, B, ...), each with a cache
# of its own for saved states (a state fits only the QEMU command line it was saved from)
# and the same images. Build the binaries with the setting to compare changed (CPU model in
# engine/src/arch.rs, `-accel` options in engine/src/qemu/spec.rs), or give the same binary
# twice with different runner arguments (EXTRA_A / EXTRA_B, e.g. "--cpus 1").
#
# Usage: bench/tcg.sh ARCH RUNS RUNNER_A RUNNER_B
# Environment: EXTRA_A, EXTRA_B (more `runner test` arguments for each side).
# Needs what bench/workload.sh needs (the debian-13-dev image; network for the source once).
set -euo pipefail

arch=${1:?usage: bench/tcg.sh ARCH RUNS RUNNER_A RUNNER_B}
runs=${2:?runs}
runner_a=${3:?runner A}
runner_b=${4:?runner B}
here=$(cd "$(dirname "$0")" && pwd)
cache=${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
project="$work/project"
"$here/workload/project.sh" "$project" system
for side in a b; do
  mkdir -p "$work/cache-$side"
  ln -s "$cache/images" "$work/cache-$side/images"
done

stats() { sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2
  printf "min %.1f  median %.1f  max %.1f", a[1], m, a[NR]}'; }
one() { # side binary extra-args
  rm -rf "$project/runner-out"
  local t0 t1 out
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086 # the extra arguments are words on purpose
  out=$(cd "$project" && RUNNER_CACHE_DIR="$work/cache-$1" "$2" test -q --arch "$arch" --suite zlib-system $3 2>&1) ||
    { echo "$out" >&2; echo "tcg.sh: side $1 failed" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') $(echo "$out" | sed -n 's/.*workload-seconds \([0-9.]*\).*/\1/p' | tail -n1)"
}
# Warm-up: each side boots cold once and saves its state (not counted).
for side in a b; do
  bin=$runner_a extra=${EXTRA_A:-}
  [ $side = b ] && bin=$runner_b extra=${EXTRA_B:-}
  # shellcheck disable=SC2086 # the extra arguments are words on purpose
  (cd "$project" && RUNNER_CACHE_DIR="$work/cache-$side" "$bin" test -q --arch "$arch" --image debian-13-dev $extra -- true >/dev/null)
done
a_wall=() a_guest=() b_wall=() b_guest=()
for i in $(seq "$runs"); do
  read -r w g < <(one a "$runner_a" "${EXTRA_A:-}"); a_wall+=("$w"); a_guest+=("$g")
  echo "run $i A: ${w}s (in the guest ${g}s)  load $(cut -d' ' -f1 /proc/loadavg)"
  read -r w g < <(one b "$runner_b" "${EXTRA_B:-}"); b_wall+=("$w"); b_guest+=("$g")
  echo "run $i B: ${w}s (in the guest ${g}s)  load $(cut -d' ' -f1 /proc/loadavg)"
done
echo
echo "zlib make test on $arch, $runs paired runs (seconds):"
echo "  A, runner test:   $(printf '%s\n' "${a_wall[@]}" | stats)"
echo "  A, in the guest:  $(printf '%s\n' "${a_guest[@]}" | stats)"
echo "  B, runner test:   $(printf '%s\n' "${b_wall[@]}" | stats)"
echo "  B, in the guest:  $(printf '%s\n' "${b_guest[@]}" | stats)"
