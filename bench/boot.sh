#!/usr/bin/env bash
# Cold-start benchmark: `runner test --arch ARCH -- true` as a whole process, against the
# floor (bench/floor.py: the same kernel, initramfs, disk and QEMU arguments started by hand,
# from QEMU start until `true` has run in the guest and QEMU has exited).
#
# Usage: bench/boot.sh [--runs N] [--warmup N] [--accel MODE] [--no-build] [ARCH...]
#   ARCH      riscv64 aarch64 x86_64 (default: all three; those without a cached image are
#             skipped with a message)
#   --runs    counted runs of each measure (default 5); runner and floor alternate
#   --warmup  uncounted runs of each first (default 1)
#   --accel   pass `--accel MODE` to runner (default: none, i.e. runner's own default, auto;
#             the floor always uses TCG, so on a host where KVM works give --accel tcg)
#   --no-build  use target/release/runner as it is (default: cargo build --release -p runner)
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
#
# Prints a markdown table (seconds, min/median/max), then the floor's phases and the peak
# memory of one extra, untimed run. Run it on an otherwise idle machine: one VM at a time.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=5
warmup=1
build=1
arches=()
runner_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs a number}; shift 2 ;;
        --accel) runner_args+=(--accel "${2:?--accel needs auto, kvm or tcg}"); shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        riscv64|aarch64|x86_64) arches+=("$1"); shift ;;
        *) echo "boot.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "boot.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $warmup in ''|*[!0-9]*) echo "boot.sh: --warmup must be a non-negative integer" >&2; exit 2 ;; esac
[ ${#arches[@]} -gt 0 ] || arches=(riscv64 aarch64 x86_64)

cache=${RUNNER_CACHE_DIR:-$HOME/.cache/runner}
runner=${RUNNER:-$root/target/release/runner}
if [ "$build" = 1 ] && [ -z "${RUNNER:-}" ]; then
    (cd "$root" && cargo build --release -q -p runner)
fi
[ -x "$runner" ] || { echo "boot.sh: no runner binary at $runner" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/runner-bench.XXXXXX")
child=
cleanup() {
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }

# min/median/max of the numbers on stdin, 2 decimals.
stats() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f / %.2f / %.2f\n", v[1], m, v[NR] }'
}
median() { stats | awk -F' / ' '{ print $2 }'; }

# The newest complete cached image of the default recipe for $1.
image_dir() {
    local d best= best_t=0 t
    for d in "$cache"/images/debian-13-"$1"-*/; do
        d=${d%/}
        [ -f "$d/manifest.json" ] && [ -f "$d/kernel" ] && [ -f "$d/initrd.cpio" ] \
            && [ -f "$d/rootfs.qcow2" ] || continue
        t=$(stat -c %Y "$d/manifest.json")
        if [ "$t" -gt "$best_t" ]; then best=$d; best_t=$t; fi
    done
    [ -n "$best" ] && echo "$best"
}

# One timed `runner test --arch $1 -- true`; prints seconds. The cwd is an empty directory
# so that no runner.toml is picked up.
time_runner() {
    local t0 t1 log=$work/runner-$1.log
    t0=$(now)
    if ! (cd "$work/cwd" && "$runner" test --arch "$1" ${runner_args[@]+"${runner_args[@]}"} -- true) >"$log" 2>&1; then
        echo "boot.sh: runner failed on $1:" >&2; tail -n 20 "$log" >&2; return 1
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
    # runner's own boot figure (QEMU start to agent answer), best effort
    sed -n 's/.*booted .* in \([0-9.]*\)s.*/\1/p' "$log" | head -n1 >>"$work/$1.runner-boot"
}

# One floor run; prints seconds, keeps the phases line.
time_floor() {
    local out
    if ! out=$(python3 "$here/floor.py" "$1" "$2" 2>"$work/floor-$1.err"); then
        echo "boot.sh: floor failed on $1:" >&2; tail -n 20 "$work/floor-$1.err" >&2; return 1
    fi
    grep '^floor ' "$work/floor-$1.err" >>"$work/$1.floor-phases" || true
    echo "$out"
}

kib_of() { # VmHWM of a pid in KiB, 0 if gone
    local k v _
    while read -r k v _; do
        [ "$k" = VmHWM: ] && { echo "$v"; return; }
    done 2>/dev/null <"/proc/$1/status" || true
    echo 0
}

# One untimed runner run, sampling the peak RSS (VmHWM) of runner and of its QEMU child
# every 0.1 s. Prints "RUNNER_KIB QEMU_KIB".
rss_runner() {
    local r_max=0 q_max=0 v c q=
    (cd "$work/cwd" && exec "$runner" test --arch "$1" ${runner_args[@]+"${runner_args[@]}"} -- true) >"$work/rss-$1.log" 2>&1 &
    child=$!
    while kill -0 "$child" 2>/dev/null; do
        v=$(kib_of "$child"); [ "$v" -gt "$r_max" ] && r_max=$v
        if [ -z "$q" ] || [ ! -e "/proc/$q" ]; then
            q=
            for c in $(cat /proc/"$child"/task/*/children 2>/dev/null); do
                case $(cat "/proc/$c/comm" 2>/dev/null) in qemu-system*) q=$c ;; esac
            done
        fi
        if [ -n "$q" ]; then v=$(kib_of "$q"); [ "$v" -gt "$q_max" ] && q_max=$v; fi
        sleep 0.1
    done
    wait "$child" || true
    child=
    echo "$r_max $q_max"
}

mib() { awk -v k="$1" 'BEGIN { if (k > 0) printf "%.0f MiB", k / 1024; else print "n/a" }'; }

mkdir -p "$work/cwd"
qemu_version=$(qemu-system-riscv64 --version 2>/dev/null | head -n1 \
    || qemu-system-x86_64 --version | head -n1)

table=()
phases=()
for arch in "${arches[@]}"; do
    if ! img=$(image_dir "$arch"); then
        echo "boot.sh: skipping $arch: no cached image (runner images build --arch $arch)" >&2
        continue
    fi
    echo "boot.sh: $arch: $img, $warmup warm-up + $runs runs of each" >&2
    : >"$work/$arch.runner"; : >"$work/$arch.floor"
    : >"$work/$arch.runner-boot"; : >"$work/$arch.floor-phases"
    for ((i = 0; i < warmup; i++)); do
        time_runner "$arch" >/dev/null && time_floor "$arch" "$img" >/dev/null || continue 2
    done
    : >"$work/$arch.runner-boot"; : >"$work/$arch.floor-phases"
    for ((i = 1; i <= runs; i++)); do
        r=$(time_runner "$arch") || continue 2
        f=$(time_floor "$arch" "$img") || continue 2
        echo "$r" >>"$work/$arch.runner"; echo "$f" >>"$work/$arch.floor"
        echo "boot.sh: $arch run $i/$runs: runner $r s, floor $f s" >&2
    done
    read -r r_kib q_kib < <(rss_runner "$arch")
    rm=$(median <"$work/$arch.runner"); fm=$(median <"$work/$arch.floor")
    ratio=$(awk -v a="$rm" -v b="$fm" 'BEGIN { printf "%.2f", a / b }')
    table+=("| $arch | $(stats <"$work/$arch.runner") | $(stats <"$work/$arch.floor") | $ratio | $(mib "$r_kib") (its QEMU: $(mib "$q_kib")) |")
    ph() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" "$work/$arch.floor-phases"; }
    phases+=("| $arch | $(ph agent | median) | $(ph true | median) | $(ph exit | median) | $(median <"$work/$arch.runner-boot") | $(mib "$(ph qemu_maxrss_kib | median)") |")
done

[ ${#table[@]} -gt 0 ] || { echo "boot.sh: no architecture had an image" >&2; exit 1; }
echo
echo "Cold start, $runs runs each (after $warmup warm-up), $(date -u '+%Y-%m-%d %H:%M UTC'), $qemu_version, $(nproc) host CPUs"
echo
echo "| arch | runner test -- true (min/median/max s) | bare QEMU floor (min/median/max s) | ratio (median) | runner max RSS |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${table[@]}"
echo
echo "Where the floor's time goes (medians, seconds from QEMU start), and runner's own boot figure:"
echo
echo "| arch | floor: agent answers | floor: \`true\` exited | floor: QEMU exited | runner: reported boot | floor QEMU max RSS |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${phases[@]}"
