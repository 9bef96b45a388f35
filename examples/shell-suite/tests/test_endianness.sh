# The CPU's byte order, seen through od(1): it reads 2-byte words in native order, so the
# bytes 01 00 read as 1 on a little-endian CPU and as 256 on a big-endian one. Of Debian's
# architectures runner boots, s390x is big-endian; the expectation comes from dpkg, not from
# the same od(1) call, so a guest of the wrong byte order fails.
. tests/lib.sh
set -e

case "$(dpkg --print-architecture)" in
  s390x | powerpc | ppc64 | mips | mips64 | hppa | sparc64) expected=256 order=big ;;
  *) expected=1 order=little ;;
esac
word=$(printf '\001\000' | od -An -tu2 | tr -d ' ')
assert_eq "$expected" "$word" "the bytes 01 00 as a native 16-bit word"
echo "$order-endian ok (uname -m: $(uname -m))"
