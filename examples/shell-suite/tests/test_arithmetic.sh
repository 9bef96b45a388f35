# Integer arithmetic, with expr(1) and with the shell's own $(( )).
. tests/lib.sh
set -e

assert_eq 5 "$(expr 2 + 3)" "expr 2 + 3"
assert_eq 42 "$(expr 6 \* 7)" "expr 6 * 7"
assert_eq 2 "$(expr 17 % 5)" "expr 17 % 5"
assert_eq -3 "$(expr 4 - 7)" "expr 4 - 7"
# Shell arithmetic is 64-bit (intmax_t) on every architecture, 32-bit ones included.
assert_eq 1099511627776 "$((1 << 40))" "1 << 40"
assert_eq 9223372036854775807 "$((9223372036854775806 + 1))" "INT64_MAX"
# The C word size matches the architecture's: 32 on armhf, i386, mipsel; 64 elsewhere.
case "$(dpkg --print-architecture)" in
  armhf | armel | i386 | mipsel) bits=32 ;;
  *) bits=64 ;;
esac
assert_eq "$bits" "$(getconf LONG_BIT)" "getconf LONG_BIT"
echo "arithmetic ok"
