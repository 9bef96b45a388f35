#!/usr/bin/env bash
# Two jobs at once against one at a time: the same two `runner test` jobs (each a CPU-bound
# shell loop in the guest) run one after the other, then both at once, alternating; the
# throughput gain is the sequential wall time over the parallel one (2.0 = two cores fully
# used).
#
# Usage: bench/parallel.sh [--runs N] [--cpus N] [--loop N] [--no-build] [ARCH]
#   ARCH      default riscv64 (image cached)
#   --runs    counted pairs (default 3; one uncounted run first saves the state)
#   --cpus    vCPUs per job (default 1: two 2-vCPU guests on 2 cores overcommit)
#   --loop    iterations of the guest's `i=$((i+1))` loop (default 200000)
#   --no-build  use target/release/runner as it is
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
# Target (issue 12): ≥ 1.6× on a 2-core machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=3
cpus=1
loop=200000
build=1
arch=riscv64
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --cpus) cpus=${2:?--cpus needs a number}; shift 2 ;;
        --loop) loop=${2:?--loop needs a number}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "parallel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
        *) arch=$1; shift ;;
    esac
done
for v in "$runs" "$cpus" "$loop"; do
    case $v in ''|*[!0-9]*|0) echo "parallel.sh: --runs, --cpus and --loop take positive integers" >&2; exit 2 ;; esac
done

runner=${RUNNER:-$root/target/release/runner}
if [ "$build" = 1 ] && [ -z "${RUNNER:-}" ]; then
    (cd "$root" && cargo build --release -q -p runner)
fi
[ -x "$runner" ] || { echo "parallel.sh: no runner binary at $runner" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/runner-parallel.XXXXXX")
pids=()
cleanup() {
    for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
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
        printf "%.2f / %.2f / %.2f\n", v[1], m, v[NR] }'
}
job() { # name
    (cd "$work/cwd" && exec "$runner" test --arch "$arch" --accel tcg --cpus "$cpus" -- \
        sh -c "i=0; while [ \$i -lt $loop ]; do i=\$((i+1)); done; echo \$i") \
        >"$work/$1.out" 2>"$work/$1.err"
}
check() { # name
    if [ "$(cat "$work/$1.out")" != "$loop" ]; then
        echo "parallel.sh: job $1 failed:" >&2; tail -n 20 "$work/$1.err" >&2; exit 1
    fi
}
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f\n", b - a }'; }

echo "parallel.sh: $arch, $cpus vCPU(s) per job, loop $loop; $runs pairs" >&2
job warmup; check warmup
for ((i = 1; i <= runs; i++)); do
    t0=$(now); job a; job b; t1=$(now)
    check a; check b
    s=$(elapsed "$t0" "$t1")
    t0=$(now)
    pids=()
    job a & pids+=($!)
    job b & pids+=($!)
    for p in "${pids[@]}"; do wait "$p"; done
    pids=()
    t1=$(now)
    check a; check b
    p=$(elapsed "$t0" "$t1")
    echo "$s" >>"$work/seq"; echo "$p" >>"$work/par"
    awk -v s="$s" -v p="$p" 'BEGIN { printf "%.2f\n", s / p }' >>"$work/gain"
    echo "parallel.sh: pair $i/$runs: one at a time $s s, both at once $p s" >&2
done
echo
echo "Two jobs, $runs pairs, $(date -u '+%Y-%m-%d %H:%M UTC'), $arch, $cpus vCPU(s) each, TCG, $(nproc) host CPUs; min / median / max"
echo
echo "| two jobs | wall (s) |"
echo "| --- | --- |"
echo "| one at a time | $(stats <"$work/seq") |"
echo "| both at once | $(stats <"$work/par") |"
echo "| throughput gain (per pair) | $(stats <"$work/gain") |"
