#!/usr/bin/env bash
# Lays out the real workload as a runner project in DIR: the debian-13-dev image recipe,
# zlib's source in DIR/src (fetched once by source.sh) and a runner.toml with one suite per
# MODE, `zlib-MODE`, whose step builds zlib and runs `make test`, printing its own duration
# by the guest clock as `workload-seconds N`; the step's text also in DIR/workload.sh (for a
# floor that runs it without runner). Used by bench/workload.sh and bench/tcg.sh.
# Usage: project.sh DIR MODE...   (MODE: system or user)
set -euo pipefail
project=${1:?project directory}
shift
[ $# -gt 0 ] || { echo "project.sh: name at least one mode (system, user)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
src=$("$here/source.sh")

mkdir -p "$project/images" "$project/src"
cp "$here/images/debian-13-dev.toml" "$project/images/"
tar -xzf "$src" -C "$project/src" --strip-components=1

# shellcheck disable=SC2016 # expanded in the guest, not here
workload='start=$(date +%s.%N)
cd src
./configure >/dev/null
make -s -j"$(nproc)" >/dev/null
make -s test
end=$(date +%s.%N)
echo "workload-seconds $(echo "$start $end" | awk "{printf \"%.2f\", \$2 - \$1}")"'
echo "$workload" >"$project/workload.sh"

{
  echo '[defaults]'
  echo 'image = "debian-13-dev"'
  echo 'timeout = "60m"'
  for mode in "$@"; do
    echo "[[suite]]"
    echo "name = \"zlib-$mode\""
    echo "mode = \"$mode\""
    echo "  [[suite.step]]"
    echo "  name = \"build and make test\""
    echo "  run = '''"
    echo "$workload"
    echo "  '''"
  done
} > "$project/runner.toml"
