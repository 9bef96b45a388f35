#!/usr/bin/env bash
# Fetches (once, into the runner cache) and checks the real workload's source, zlib 1.3.1 as
# Debian 13 ships it, and prints its path. Used by bench/workload/project.sh.
set -euo pipefail
cache=${RUNNER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/runner}
src_name=zlib_1.3.dfsg+really1.3.1.orig.tar.gz
src_sha=60dd315c07f616887caa029408308a018ace66e3d142726a97db164b3b8f69fb
src_url=http://deb.debian.org/debian/pool/main/z/zlib/$src_name
mkdir -p "$cache/bench"
src="$cache/bench/$src_name"
if ! { [ -f "$src" ] && echo "$src_sha  $src" | sha256sum -c --quiet; }; then
  curl -fsS --max-time 120 -o "$src.part" "$src_url"
  echo "$src_sha  $src.part" | sha256sum -c --quiet
  mv "$src.part" "$src"
fi
echo "$src"
