#!/usr/bin/env bash
# Matrix benchmark: wall time of `runner matrix` over a 4-cell matrix (2 suites × riscv64,
# aarch64; the shell example's tests) with --jobs 1 and with --jobs 2, the speed-up, and the
# peak memory of the whole run (runner plus every QEMU it started, summed, sampled).
#
# Usage: bench/matrix.sh [--runs N] [--warmup N] [--cpus N] [--no-build]
#   --runs      counted runs of each --jobs value (default 5); the two alternate
#   --warmup    uncounted runs of each first (default 1: saves VM states if there are none)
#   --cpus      vCPUs per VM (default 2, runner's default)
#   --no-build  use target/release/runner as it is (default: cargo build --release -p runner)
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
# Needs the riscv64 and aarch64 images cached (runner images build --arch riscv64,aarch64).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=5
warmup=1
build=1
cpus=2
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs a number}; shift 2 ;;
        --cpus) cpus=${2:?--cpus needs a number}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "matrix.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "matrix.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $warmup in ''|*[!0-9]*) echo "matrix.sh: --warmup must be a non-negative integer" >&2; exit 2 ;; esac
case $cpus in ''|*[!0-9]*|0) echo "matrix.sh: --cpus must be a positive integer" >&2; exit 2 ;; esac

runner=${RUNNER:-$root/target/release/runner}
if [ "$build" = 1 ] && [ -z "${RUNNER:-}" ]; then
    (cd "$root" && cargo build --release -q -p runner)
fi
[ -x "$runner" ] || { echo "matrix.sh: no runner binary at $runner" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/runner-matrix-bench.XXXXXX")
child=
cleanup() {
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The project: the shell example's tests as two suites, on two architectures.
cp -a "$root/examples/shell-suite/tests" "$work/tests"
cat >"$work/runner.toml" <<'TOML'
[[suite]]
name = "system"
  [[suite.step]]
  name = "facts"
  run = "uname -a; nproc; [ \"$(uname -m)\" = \"$RUNNER_ARCH\" ]"

[[suite]]
name = "unit"
junit = ["build/junit/*.xml"]
  [[suite.step]]
  name = "unit"
  run = "sh tests/run.sh build/junit/shell.xml"
TOML
cat >"$work/bench.toml" <<TOML
suites = ["system", "unit"]
arch = ["riscv64", "aarch64"]
retries = 0
cpus = $cpus
TOML

now() { date +%s.%N; }

# min / median / max of the numbers on stdin, 2 decimals.
stats() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f / %.2f / %.2f\n", v[1], m, v[NR] }'
}
median() { stats | awk -F' / ' '{ print $2 }'; }

# RSS in KiB of process $1 and all its descendants, summed; and of $1 alone.
tree_rss() {
    ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
        { parent[$1] = $2; rss[$1] = $3 }
        END {
            total = 0
            for (p in parent) {
                q = p
                while (q != "" && q != 0 && q != 1 && q != root) q = parent[q]
                if (q == root) total += rss[p]
            }
            printf "%d %d\n", total, rss[root] + 0
        }'
}

# One matrix run with --jobs $1; prints "seconds peak_tree_kib peak_runner_kib". With $2 =
# "sample", the process tree's memory is sampled every 0.2 s; timed runs do not sample, because
# `ps` over every process costs enough CPU on a 2-core host to slow the parallel runs most.
one_run() {
    local jobs=$1 mode=${2:-} start end peak=0 peak_self=0 t s
    rm -rf "$work/report"
    start=$(now)
    "$runner" --quiet matrix bench.toml --jobs "$jobs" --out report --fail-on never \
        >/dev/null 2>"$work/stderr" &
    child=$!
    if [ "$mode" = sample ]; then
        while kill -0 "$child" 2>/dev/null; do
            read -r t s < <(tree_rss "$child")
            [ "$t" -gt "$peak" ] && peak=$t
            [ "$s" -gt "$peak_self" ] && peak_self=$s
            sleep 0.2
        done
    fi
    wait "$child" || { echo "matrix.sh: runner failed:" >&2; cat "$work/stderr" >&2; exit 1; }
    child=
    end=$(now)
    # Every cell must have passed, or the timing means nothing.
    if ! grep -q '"complete": true' "$work/report/results.json" ||
        grep -q '"status": "\(failed\|error\|timed_out\)"' "$work/report/results.json"; then
        echo "matrix.sh: a cell did not pass; see $work/report" >&2; trap - EXIT; exit 1
    fi
    echo "$(awk -v a="$end" -v b="$start" 'BEGIN { printf "%.2f", a - b }') $peak $peak_self"
}

cd "$work"
echo "matrix.sh: 4 cells (system, unit × riscv64, aarch64), $cpus vCPUs each, $runs runs per --jobs after $warmup warm-up" >&2
for _ in $(seq "$warmup"); do one_run 1 >/dev/null; one_run 2 >/dev/null; done
: >"$work/j1"
: >"$work/j2"
for i in $(seq "$runs"); do
    for j in 1 2; do
        r=$(one_run "$j")
        echo "$r" >>"$work/j$j"
        echo "  run $i --jobs $j: ${r%% *} s" >&2
    done
done
# Memory: one sampled run of each (not timed).
one_run 1 sample >"$work/m1"
one_run 2 sample >"$work/m2"
j1=$(cut -d' ' -f1 "$work/j1" | stats)
j2=$(cut -d' ' -f1 "$work/j2" | stats)
m1=$(cut -d' ' -f1 "$work/j1" | median)
m2=$(cut -d' ' -f1 "$work/j2" | median)
mem1=$(cut -d' ' -f2 "$work/m1")
mem2=$(cut -d' ' -f2 "$work/m2")
self=$(cut -d' ' -f3 "$work/m1" "$work/m2" | sort -g | tail -n1)
echo
echo "| --jobs | wall time, s (min / median / max) | peak memory, runner + QEMU (MiB) |"
echo "| --- | --- | --- |"
echo "| 1 | $j1 | $((mem1 / 1024)) |"
echo "| 2 | $j2 | $((mem2 / 1024)) |"
echo
echo "speed-up (median --jobs 1 / median --jobs 2): $(awk -v a="$m1" -v b="$m2" 'BEGIN { printf "%.2f", a / b }')x; runner alone peaks at $((self / 1024)) MiB"
echo "host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
