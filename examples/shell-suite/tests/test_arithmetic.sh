# Integer arithmetic, with expr(1) and with the shell's own $(( )).
. tests/lib.sh
set -e

assert_eq 5 "$(expr 2 + 3)" "expr 2 + 3"
assert_eq 42 "$(expr 6 \* 7)" "expr 6 * 7"
assert_eq 2 "$(expr 17 % 5)" "expr 17 % 5"
assert_eq -3 "$(expr 4 - 7)" "expr 4 - 7"
# Shell arithmetic is at least 64-bit on all three architectures.
assert_eq 1099511627776 "$((1 << 40))" "1 << 40"
assert_eq 9223372036854775807 "$((9223372036854775806 + 1))" "INT64_MAX"
echo "arithmetic ok"
