#!/usr/bin/env bash
# Regenerate patches/*.patch and patches/series from the commits a Megatron-LM checkout has on
# top of the pinned ref (tag moetion/upstream-head, or the SHA in patches/MEGATRON_LM_REF).
#
#   scripts/export_patches.sh MEGATRON_DIR
#
# Each commit becomes <subject>.patch (git format-patch --zero-commit --no-signature), so
# re-exporting unchanged commits gives byte-identical files.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
mdir=${1:?usage: export_patches.sh MEGATRON_DIR}
read -r _tag sha < "$here/patches/MEGATRON_LM_REF"
base=$sha
git -C "$mdir" rev-parse -q --verify moetion/upstream-head >/dev/null && base=moetion/upstream-head
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git -C "$mdir" format-patch -q --zero-commit --no-signature --no-numbered -o "$tmp" "$base..HEAD"
rm -f "$here"/patches/*.patch
: > "$here/patches/series"
for f in "$tmp"/*.patch; do
  subject=$(sed -n 's/^Subject: \[PATCH\] //p' "$f" | head -n 1)
  [[ $subject =~ ^[a-z0-9_]+$ ]] || { echo "bad patch subject '$subject' (want <area>_<what>)" >&2; exit 1; }
  cp "$f" "$here/patches/$subject.patch"
  echo "$subject.patch" >> "$here/patches/series"
done
echo "exported $(wc -l < "$here/patches/series") patches to $here/patches"
