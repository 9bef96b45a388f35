#!/usr/bin/env bash
# Output-flood benchmark: runner's own peak memory while a guest command writes SIZE of
# output through the live output port (to runner's stdout, here /dev/null), against a run of
# `true` (the baseline), alternating: `runner test --arch ARCH -- sh -c 'head -c SIZE
# /dev/zero | tr "\0" x'`. The peak is runner's VmHWM (not its QEMU's), sampled every 0.1 s;
# it only grows, so the last sample before runner exits is its peak.
#
# Usage: bench/flood.sh [--runs N] [--size SIZE] [--no-build] [ARCH]
#   ARCH      default riscv64 (image and saved state cached: run `runner test -- true` once)
#   --runs    counted pairs (default 3)
#   --size    what `head -c` takes (default 1G)
#   --no-build  use target/release/runner as it is
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
# Target (issue 12): runner's peak RSS ≤ 64 MiB during a 1 GiB flood.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=3
size=1G
build=1
arch=riscv64
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --size) size=${2:?--size needs a size}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "flood.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
        *) arch=$1; shift ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "flood.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $size in ''|*[!0-9KMG]*) echo "flood.sh: --size must be like 1G, 64M" >&2; exit 2 ;; esac

runner=${RUNNER:-$root/target/release/runner}
if [ "$build" = 1 ] && [ -z "${RUNNER:-}" ]; then
    (cd "$root" && cargo build --release -q -p runner)
fi
[ -x "$runner" ] || { echo "flood.sh: no runner binary at $runner" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/runner-flood.XXXXXX")
child=
cleanup() {
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/cwd" # an empty cwd: no runner.toml is picked up

now() { date +%s.%N; }
stats() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.1f / %.1f / %.1f\n", v[1], m, v[NR] }'
}
hwm_kib() {
    local k v _
    while read -r k v _; do
        [ "$k" = VmHWM: ] && { echo "$v"; return; }
    done 2>/dev/null <"/proc/$1/status" || true
    echo 0
}

# One run of `runner test -- "$@"`; prints "SECONDS PEAK_MIB START_KIND".
measure() {
    local t0 t1 peak=0 v
    t0=$(now)
    (cd "$work/cwd" && exec "$runner" test --arch "$arch" --accel tcg -- "$@") >/dev/null 2>"$work/err" &
    child=$!
    while kill -0 "$child" 2>/dev/null; do
        v=$(hwm_kib "$child"); [ "$v" -gt "$peak" ] && peak=$v
        sleep 0.1
    done
    if ! wait "$child"; then
        child=
        echo "flood.sh: runner failed:" >&2; tail -n 20 "$work/err" >&2; return 1
    fi
    child=
    t1=$(now)
    kind=$(sed -n 's/^started .*(\([^;]*\);.*/\1/p' "$work/err" | head -n1 | tr ' ' _)
    awk -v a="$t0" -v b="$t1" -v k="$peak" -v s="$kind" 'BEGIN { printf "%.2f %.1f %s\n", b - a, k / 1024, s }'
}

flood=(sh -c "head -c $size /dev/zero | tr '\\0' x")
echo "flood.sh: $arch, $runs pairs of: a $size flood, then \`true\`" >&2
measure true >/dev/null # warm-up: a saved state to resume
for ((i = 1; i <= runs; i++)); do
    read -r fs fm fk < <(measure "${flood[@]}")
    read -r bs bm bk < <(measure true)
    echo "$fs" >>"$work/flood.s"; echo "$fm" >>"$work/flood.mib"
    echo "$bs" >>"$work/base.s"; echo "$bm" >>"$work/base.mib"
    echo "flood.sh: pair $i/$runs: flood ${fs} s, runner peak ${fm} MiB ($fk); true ${bs} s, ${bm} MiB ($bk)" >&2
done
echo
echo "Output flood, $runs pairs, $(date -u '+%Y-%m-%d %H:%M UTC'), $arch, TCG, $(nproc) host CPUs; min / median / max"
echo
echo "| run | wall (s) | runner peak RSS (MiB) |"
echo "| --- | --- | --- |"
printf '| %s flood (`head -c %s /dev/zero \\| tr '"'"'\\0'"'"' x`) | %s | %s |\n' "$size" "$size" "$(stats <"$work/flood.s")" "$(stats <"$work/flood.mib")"
echo "| \`true\` | $(stats <"$work/base.s") | $(stats <"$work/base.mib") |"
