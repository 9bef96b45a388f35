# File operations in a temporary directory: create, find, archive and compare.
. tests/lib.sh
set -e

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src/sub"
printf 'one\n' >"$dir/src/a.txt"
printf 'two\n' >"$dir/src/sub/b.txt"
ln -s a.txt "$dir/src/link"

assert_eq 2 "$(find "$dir/src" -type f | wc -l | tr -d ' ')" "regular files found"
assert_eq "one" "$(cat "$dir/src/link")" "reading through a symlink"

# A tar.gz round trip must give back the same bytes.
tar -C "$dir" -czf "$dir/src.tar.gz" src
mkdir "$dir/out"
tar -C "$dir/out" -xzf "$dir/src.tar.gz"
assert_eq "$(cksum <"$dir/src/sub/b.txt")" "$(cksum <"$dir/out/src/sub/b.txt")" "sub/b.txt after tar"
[ -L "$dir/out/src/link" ] || fail "tar round trip lost the symlink"
echo "files ok"
