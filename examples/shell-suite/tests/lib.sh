# Assertions for the tests, sourced by each tests/test_*.sh. A failed assertion prints
# what it expected as its last line (run.sh uses that as the failure message) and exits 1.

fail() {
  echo "FAIL: $*"
  exit 1
}

# assert_eq EXPECTED ACTUAL [WHAT]
assert_eq() {
  [ "$1" = "$2" ] || fail "${3:-value}: expected '$1', got '$2'"
}
