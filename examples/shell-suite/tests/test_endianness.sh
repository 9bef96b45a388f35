# The CPU's byte order, seen through od(1): it reads 2-byte words in native order, so the
# bytes 01 00 read as 1 on a little-endian CPU. riscv64, aarch64 and x86_64 (as Debian
# runs them) are all little-endian.
. tests/lib.sh
set -e

word=$(printf '\001\000' | od -An -tu2 | tr -d ' ')
assert_eq 1 "$word" "the bytes 01 00 as a native 16-bit word"
echo "little-endian ok (uname -m: $(uname -m))"
