# String manipulation with sed, tr and the shell's parameter expansion.
. tests/lib.sh
set -e

assert_eq "hello there" "$(echo 'hello world' | sed 's/world/there/')" "sed substitution"
assert_eq "a-b-c" "$(echo 'a b c' | sed 's/ /-/g')" "sed global substitution"
assert_eq "HELLO" "$(echo hello | tr 'a-z' 'A-Z')" "tr to upper case"
assert_eq "bcd" "$(echo abcde | cut -c2-4)" "cut characters"
path=/workspace/build/junit/shell.xml
assert_eq "shell.xml" "${path##*/}" "strip the directory"
assert_eq "/workspace/build/junit" "${path%/*}" "strip the file name"
assert_eq 5 "$(printf 'hello' | wc -c | tr -d ' ')" "byte count"
echo "strings ok"
