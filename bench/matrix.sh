#!/usr/bin/env bash
# Matrix benchmark: wall time of `runner matrix` over a 4-cell matrix (2 suites × riscv64,
# aarch64; the shell example's tests) for several schedules (--jobs × --cpus), each against
# the others in paired, alternating runs; and the peak memory of the whole run (runner plus
# every QEMU it started, summed, sampled).
#
# Usage: bench/matrix.sh [--runs N] [--warmup N] [--configs "J:C ..."] [--no-build]
#   --runs      counted runs of each schedule (default 5); the schedules alternate
#   --warmup    uncounted runs of each first (default 1: saves VM states if there are none)
#   --configs   schedules as JOBS:CPUS, either "auto" for runner's own pick (default
#               "auto:auto 1:2 2:2 1:1 2:1": the default against every hand-picked pair)
#   --no-build  use target/release/runner as it is (default: cargo build --release -p runner)
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
# Needs the riscv64 and aarch64 images cached (runner images build --arch riscv64,aarch64).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=5
warmup=1
build=1
configs="auto:auto 1:2 2:2 1:1 2:1"
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs a number}; shift 2 ;;
        --configs) configs=${2:?--configs needs a list}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "matrix.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "matrix.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $warmup in ''|*[!0-9]*) echo "matrix.sh: --warmup must be a non-negative integer" >&2; exit 2 ;; esac
for c in $configs; do
    case $c in
        auto:auto|auto:[1-9]|auto:[1-9][0-9]|[1-9]:auto|[1-9][0-9]:auto|[1-9]:[1-9]|[1-9]:[1-9][0-9]|[1-9][0-9]:[1-9]|[1-9][0-9]:[1-9][0-9]) ;;
        *) echo "matrix.sh: --configs: '$c' is not JOBS:CPUS (numbers or auto)" >&2; exit 2 ;;
    esac
done

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

# One matrix run with schedule $1 (JOBS:CPUS); prints "seconds peak_tree_kib peak_runner_kib
# picked", picked being the schedule runner announced. With $2 = "sample", the process tree's
# memory is sampled every 0.2 s; timed runs do not sample, because `ps` over every process
# costs enough CPU on a 2-core host to slow the parallel runs most.
one_run() {
    local config=$1 mode=${2:-} start end peak=0 peak_self=0 t s flags=()
    [ "${config%%:*}" = auto ] || flags+=(--jobs "${config%%:*}")
    [ "${config##*:}" = auto ] || flags+=(--cpus "${config##*:}")
    rm -rf "$work/report"
    start=$(now)
    "$runner" matrix bench.toml "${flags[@]}" --out report --fail-on never \
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
    picked=$(sed -n 's/^runner matrix: [0-9]* cells from [^,]*, \([0-9]* at a time, [0-9]* vCPUs\{0,1\}\) each.*/\1/p' "$work/stderr" | head -n1)
    echo "$(awk -v a="$end" -v b="$start" 'BEGIN { printf "%.2f", a - b }') $peak $peak_self ${picked// /_}"
}

cd "$work"
set -- $configs
echo "matrix.sh: 4 cells (system, unit × riscv64, aarch64), schedules (jobs:cpus) $*, $runs runs each after $warmup warm-up" >&2
for _ in $(seq "$warmup"); do for c; do one_run "$c" >/dev/null; done; done
for c; do : >"$work/t.$c"; done
for i in $(seq "$runs"); do
    for c; do
        r=$(one_run "$c")
        echo "$r" >>"$work/t.$c"
        echo "  run $i $c: ${r%% *} s" >&2
    done
done
echo
echo "| schedule (jobs:cpus) | runner ran | wall time, s (min / median / max) | peak memory, runner + QEMU (MiB) |"
echo "| --- | --- | --- | --- |"
best=
for c; do
    # Memory: one sampled run of each (not timed).
    mem=$(one_run "$c" sample | cut -d' ' -f2)
    picked=$(cut -d' ' -f4 "$work/t.$c" | head -n1 | tr _ ' ')
    med=$(cut -d' ' -f1 "$work/t.$c" | median)
    echo "| $c | $picked | $(cut -d' ' -f1 "$work/t.$c" | stats) | $((mem / 1024)) |"
    case $c in auto:auto) ;; *) best=$(printf '%s\n%s %s\n' "$best" "$med" "$c" | sed '/^$/d' | sort -g | head -n1) ;; esac
done
echo
if [ -f "$work/t.auto:auto" ] && [ -n "$best" ]; then
    auto=$(cut -d' ' -f1 "$work/t.auto:auto" | median)
    echo "default (auto:auto) median $auto s; best hand-picked ${best#* } median ${best%% *} s: default / best = $(awk -v a="$auto" -v b="${best%% *}" 'BEGIN { printf "%.2f", a / b }')"
fi
echo "host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%Y-%m-%dT%H:%MZ)"
