#!/bin/sh
# A tiny test runner in POSIX sh (dash, busybox sh and bash all run it).
#
# Runs every tests/test_*.sh in its own `sh`, from the directory above tests/. Prints one
# line per test as it finishes ("ok - name" or "not ok - name", then the failed test's
# output), writes a JUnit XML report, and exits 1 if any test failed.
#
#   usage: sh tests/run.sh [report.xml]     (default: build/junit/shell.xml)
set -u

cd "$(dirname "$0")/.." || exit 2
report=${1:-build/junit/shell.xml}
mkdir -p "$(dirname "$report")" || exit 2
work=$(mktemp -d) || exit 2
trap 'rm -rf "$work"' EXIT INT TERM

# Nanoseconds since the epoch: GNU date knows %N; where it does not, whole seconds do.
now_ns() {
  t=$(date +%s%N)
  case $t in *N) echo "$(date +%s)000000000" ;; *) echo "$t" ;; esac
}

# Nanoseconds as seconds with three decimals, without awk or bc.
seconds() {
  printf '%d.%03d' $(($1 / 1000000000)) $(($1 / 1000000 % 1000))
}

# Standard input made safe inside an XML attribute or element: the five special
# characters escaped, and control characters (not allowed in XML 1.0) dropped.
xml_escape() {
  tr -d '\000-\010\013\014\016-\037' |
    sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g' -e "s/'/\&apos;/g"
}

total=0
failed=0
suite_start=$(now_ns)
: >"$work/cases"
for file in tests/test_*.sh; do
  [ -e "$file" ] || continue # the glob matched nothing
  name=$(basename "$file" .sh)
  name=${name#test_}
  total=$((total + 1))
  start=$(now_ns)
  sh "$file" >"$work/out" 2>&1
  status=$?
  elapsed=$(seconds $(($(now_ns) - start)))
  ename=$(printf '%s' "$name" | xml_escape)
  printf '    <testcase classname="shell" name="%s" time="%s">\n' "$ename" "$elapsed" >>"$work/cases"
  if [ "$status" -eq 0 ]; then
    echo "ok - $name ($elapsed s)"
    printf '      <system-out>' >>"$work/cases"
    xml_escape <"$work/out" >>"$work/cases"
    printf '</system-out>\n' >>"$work/cases"
  else
    failed=$((failed + 1))
    echo "not ok - $name ($elapsed s, exit status $status)"
    sed 's/^/#   /' "$work/out"
    # The message is the output's last line, usually the failed assertion; the body is all
    # of the output.
    message=$(tail -n 1 "$work/out" | xml_escape)
    printf '      <failure message="%s" type="exit status %d">' "$message" "$status" >>"$work/cases"
    xml_escape <"$work/out" >>"$work/cases"
    printf '</failure>\n' >>"$work/cases"
  fi
  printf '    </testcase>\n' >>"$work/cases"
done

if [ "$total" -eq 0 ]; then
  echo "run.sh: no tests/test_*.sh found" >&2
  exit 2
fi

time=$(seconds $(($(now_ns) - suite_start)))
{
  echo '<?xml version="1.0" encoding="UTF-8"?>'
  printf '<testsuites tests="%d" failures="%d" time="%s">\n' "$total" "$failed" "$time"
  printf '  <testsuite name="shell" tests="%d" failures="%d" errors="0" skipped="0" time="%s">\n' \
    "$total" "$failed" "$time"
  cat "$work/cases"
  echo '  </testsuite>'
  echo '</testsuites>'
} >"$report"

echo "$((total - failed)) passed, $failed failed (report: $report)"
[ "$failed" -eq 0 ]
