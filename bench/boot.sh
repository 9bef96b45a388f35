#!/usr/bin/env bash
# Cold-start benchmark: `runner test --arch ARCH -- true` as a whole process, against the
# floor (bench/floor.py: the same QEMU arguments started by hand, from QEMU start until
# `true` has run in the guest and QEMU has exited), in both of runner's start modes:
#   resumed  runner's default: resume the VM state saved after a first boot
#            vs. the floor resuming that same saved state (floor.py --resume)
#   cold     runner --cold-boot: boot the kernel + initramfs + root disk
#            vs. the floor booting the same kernel, initramfs and disk
#
# Usage: bench/boot.sh [--runs N] [--warmup N] [--mode both|resumed|cold] [--no-build] [ARCH...]
#   ARCH      any of `runner doctor`'s (default: riscv64 aarch64 x86_64; `all` for every one;
#             those without a cached image are skipped with a message)
#   --runs    counted runs of each measure (default 5); the measures alternate
#   --warmup  uncounted runs of each first (default 1; the first runner run saves the state)
#   --mode    which start modes to measure (default both)
#   --no-build  use target/release/runner as it is (default: cargo build --release -p runner)
# Environment: RUNNER_CACHE_DIR (as runner), RUNNER (binary, default target/release/runner).
# Always TCG (runner is given --accel tcg, as the floor uses TCG). One VM at a time: run it
# on an otherwise idle machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
runs=5
warmup=1
build=1
mode=both
arches=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --warmup) warmup=${2:?--warmup needs a number}; shift 2 ;;
        --mode) mode=${2:?--mode needs both, resumed or cold}; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "boot.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
        *) arches+=("$1"); shift ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "boot.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case $warmup in ''|*[!0-9]*) echo "boot.sh: --warmup must be a non-negative integer" >&2; exit 2 ;; esac
case $mode in both) modes=(resumed cold) ;; resumed|cold) modes=("$mode") ;;
    *) echo "boot.sh: --mode must be both, resumed or cold" >&2; exit 2 ;; esac
[ ${#arches[@]} -gt 0 ] || arches=(riscv64 aarch64 x86_64)

cache=${RUNNER_CACHE_DIR:-$HOME/.cache/runner}
runner=${RUNNER:-$root/target/release/runner}
if [ "$build" = 1 ] && [ -z "${RUNNER:-}" ]; then
    (cd "$root" && cargo build --release -q -p runner)
fi
[ -x "$runner" ] || { echo "boot.sh: no runner binary at $runner" >&2; exit 1; }
table_json=$("$runner" doctor --json)
all_arches=$(python3 -c 'import json,sys; print(" ".join(r["name"] for r in json.loads(sys.argv[1])))' "$table_json")
if [ "${arches[*]}" = all ]; then read -r -a arches <<<"$all_arches"; fi
for a in "${arches[@]}"; do
    case " $all_arches " in *" $a "*) ;; *) echo "boot.sh: unknown architecture '$a' (known: $all_arches)" >&2; exit 2 ;; esac
done
# vCPUs and MiB runner gives a default job on ARCH (the arch's default vCPUs, 1024 MiB or the
# machine's limit), which name its saved state.
cpus_of() { python3 -c 'import json,sys; r=[r for r in json.loads(sys.argv[1]) if r["name"]==sys.argv[2]][0]; print(r["default_cpus"])' "$table_json" "$1"; }
mem_of() { python3 -c 'import json,sys; r=[r for r in json.loads(sys.argv[1]) if r["name"]==sys.argv[2]][0]; print(min(1024, r["max_memory_mib"]))' "$table_json" "$1"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/runner-bench.XXXXXX")
child=
cleanup() {
    if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/cwd" # an empty cwd: no runner.toml is picked up
echo "$table_json" >"$work/arches.json"

now() { date +%s.%N; }

# min / median / max of the numbers on stdin, 2 decimals.
stats() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f / %.2f / %.2f\n", v[1], m, v[NR] }'
}
median() { stats | awk -F' / ' '{ print $2 }'; }

# The newest directory matching the glob $1 that holds all of the files $2...
newest_with() {
    local pattern=$1 d f best= best_t=0 t
    shift
    for d in $pattern; do
        d=${d%/}
        for f in "$@"; do [ -f "$d/$f" ] || continue 2; done
        t=$(stat -c %Y "$d/$1")
        if [ "$t" -gt "$best_t" ]; then best=$d; best_t=$t; fi
    done
    [ -n "$best" ] && echo "$best"
}
# The image of today's recipe and builder (the cache may hold older ones under other keys).
image_dir() {
    local key
    key=$("$runner" images key --arch "$1") || return 1
    [ -f "$cache/images/$key/rootfs.qcow2" ] && echo "$cache/images/$key"
}
# The state runner saved for this image (arch $2) with its default vCPUs and memory, TCG.
state_dir() { newest_with "$cache/states/$(basename "$1")-*-tcg-$(cpus_of "$2")c-$(mem_of "$2")m-qemu*/" meta.json ram.bin disk.qcow2; }

runner_args() { # mode arch
    echo test --arch "$2" --accel tcg
    [ "$1" = cold ] && echo --cold-boot
    echo -- true
}

# One timed runner run (mode, arch); prints seconds, keeps runner's own boot figure.
time_runner() {
    local t0 t1 log=$work/runner.log
    t0=$(now)
    # shellcheck disable=SC2046 # runner_args prints plain words
    if ! (cd "$work/cwd" && "$runner" $(runner_args "$1" "$2")) >"$log" 2>&1; then
        echo "boot.sh: runner failed ($2, $1):" >&2; tail -n 20 "$log" >&2; return 1
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
    sed -n 's/.* VM [^ ]* in \([0-9.]*\)s .*/\1/p' "$log" | head -n1 >>"$work/$2.$1.runner-boot"
}

# One floor run (mode, arch, image, state); prints seconds, keeps the phases line.
time_floor() {
    local out resume=()
    [ "$1" = resumed ] && resume=(--resume "$4")
    if ! out=$(python3 "$here/floor.py" --table "$work/arches.json" ${resume[@]+"${resume[@]}"} "$2" "$3" 2>"$work/floor.err"); then
        echo "boot.sh: floor failed ($2, $1):" >&2; tail -n 20 "$work/floor.err" >&2; return 1
    fi
    grep '^floor ' "$work/floor.err" >>"$work/$2.$1.floor-phases" || true
    echo "$out"
}

kib_of() { # VmHWM of a pid in KiB, 0 if gone
    local k v _
    while read -r k v _; do
        [ "$k" = VmHWM: ] && { echo "$v"; return; }
    done 2>/dev/null <"/proc/$1/status" || true
    echo 0
}

# One untimed runner run (mode, arch), sampling the peak RSS (VmHWM) of runner and of its
# QEMU child every 0.1 s. Prints "RUNNER_KIB QEMU_KIB".
rss_runner() {
    local r_max=0 q_max=0 v c q=
    # shellcheck disable=SC2046
    (cd "$work/cwd" && exec "$runner" $(runner_args "$1" "$2")) >"$work/rss.log" 2>&1 &
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

qemu_version=$(qemu-system-riscv64 --version 2>/dev/null | head -n1 \
    || qemu-system-x86_64 --version | head -n1)

table=()
phases=()
images=()
for arch in "${arches[@]}"; do
    if ! img=$(image_dir "$arch"); then
        echo "boot.sh: skipping $arch: no cached image (runner images build --arch $arch)" >&2
        continue
    fi
    echo "boot.sh: $arch: $img; $warmup warm-up + $runs runs of each of: ${modes[*]}" >&2
    images+=("$(python3 - "$img" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
size = sum(a["size"] for a in m["artifacts"].values()) / 2**20
print("| %s | %s (%s, kernel %s) | %.0f s | %.0f MiB |" % (
    m["arch"], m["recipe"], m["distribution"], m["kernel_version"], m["build_seconds"], size))
PY
)")
    st=
    for m in "${modes[@]}"; do
        rm -f "$work/$arch.$m".*
        for ((i = 0; i < warmup; i++)); do
            time_runner "$m" "$arch" >/dev/null || continue 3
            if [ "$m" = resumed ] && [ -z "$st" ] && ! st=$(state_dir "$img" "$arch"); then
                echo "boot.sh: $arch: runner saved no state under $cache/states; skipping resumed" >&2
                continue 2
            fi
            time_floor "$m" "$arch" "$img" "$st" >/dev/null || continue 3
        done
        rm -f "$work/$arch.$m".*
    done
    if [ " ${modes[*]} " != " cold " ] && [ -z "$st" ] && ! st=$(state_dir "$img" "$arch"); then
        # --warmup 0 and no state yet: one uncounted runner run saves it
        time_runner resumed "$arch" >/dev/null || continue
        st=$(state_dir "$img" "$arch") || { echo "boot.sh: $arch: no saved state; skipping" >&2; continue; }
        rm -f "$work/$arch.resumed".*
    fi
    for ((i = 1; i <= runs; i++)); do
        for m in "${modes[@]}"; do
            r=$(time_runner "$m" "$arch") || continue 3
            f=$(time_floor "$m" "$arch" "$img" "$st") || continue 3
            echo "$r" >>"$work/$arch.$m.runner"; echo "$f" >>"$work/$arch.$m.floor"
            echo "boot.sh: $arch $m run $i/$runs: runner $r s, floor $f s" >&2
        done
    done
    for m in "${modes[@]}"; do
        read -r r_kib q_kib < <(rss_runner "$m" "$arch")
        rm_=$(median <"$work/$arch.$m.runner"); fm=$(median <"$work/$arch.$m.floor")
        ratio=$(awk -v a="$rm_" -v b="$fm" 'BEGIN { printf "%.2f", a / b }')
        label="$arch, resumed (default)"; [ "$m" = cold ] && label="$arch, --cold-boot"
        table+=("| $label | $(stats <"$work/$arch.$m.runner") | $(stats <"$work/$arch.$m.floor") | $ratio | $(mib "$r_kib") (its QEMU: $(mib "$q_kib")) |")
        ph() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" "$work/$arch.$m.floor-phases"; }
        restored=$(ph restored | median); [ "$m" = cold ] && restored=-
        phases+=("| $label | $restored | $(ph agent | median) | $(ph true | median) | $(ph exit | median) | $(median <"$work/$arch.$m.runner-boot") | $(mib "$(ph qemu_maxrss_kib | median)") |")
    done
done

[ ${#table[@]} -gt 0 ] || { echo "boot.sh: nothing was measured" >&2; exit 1; }
echo
echo "Start-up, $runs runs each (after $warmup warm-up), $(date -u '+%Y-%m-%d %H:%M UTC'), $qemu_version, TCG, $(nproc) host CPUs"
echo
echo "| arch, start mode | runner test -- true (min/median/max s) | bare QEMU floor (min/median/max s) | ratio (median) | runner max RSS |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${table[@]}"
echo
echo "Where the floor's time goes (medians, seconds from QEMU start), and runner's own figure for its VM start:"
echo
echo "| arch, start mode | floor: state loaded | floor: agent answers | floor: \`true\` exited | floor: QEMU exited | runner: reported start | floor QEMU max RSS |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${phases[@]}"
echo
echo "The images (build time as recorded when each was built, on whatever else the machine was doing then; size = kernel + initramfs + compressed root disk):"
echo
echo "| arch | image | build time | size |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${images[@]}"
