#!/usr/bin/env bash
# Apply the megatron-moetion patch series to a Megatron-LM checkout.
#
#   scripts/apply_patches.sh [--check] [--revert] [--force] MEGATRON_DIR
#
# MEGATRON_DIR is either a Megatron-LM git checkout, whose HEAD must be the commit pinned in
# patches/MEGATRON_LM_REF, or a plain tree holding megatron/ (such as a copy of the
# megatron-core wheel), whose megatron/core/package_info.py must be a supported version.
# --force skips that check. The series is applied all or nothing: on any mismatch or rejected
# hunk the script names the patch and the file, exits 1 and leaves the tree unchanged.
# A second run reports "already applied" and exits 0. --check only checks; --revert removes the
# series again. The patches change the working tree only (no commits).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
mode=apply force=0 mdir=""
for arg in "$@"; do
  case $arg in
    --check) mode=check ;;
    --revert) mode=revert ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "apply_patches.sh: unknown option '$arg' (allowed: --check, --revert, --force)" >&2; exit 2 ;;
    *) [[ -z $mdir ]] || { echo "apply_patches.sh: one MEGATRON_DIR only" >&2; exit 2; }; mdir=$arg ;;
  esac
done
[[ -n $mdir ]] || { echo "usage: apply_patches.sh [--check] [--revert] [--force] MEGATRON_DIR" >&2; exit 2; }
[[ -d $mdir/megatron ]] || { echo "apply_patches.sh: '$mdir' has no megatron/ directory" >&2; exit 1; }
mdir=$(cd "$mdir" && pwd)

read -r ref_tag ref_sha < "$here/patches/MEGATRON_LM_REF"
mapfile -t series < <(grep -v '^\s*\(#\|$\)' "$here/patches/series")
patches=()
for name in "${series[@]}"; do
  [[ -f $here/patches/$name ]] || { echo "apply_patches.sh: patches/series names '$name', which does not exist" >&2; exit 1; }
  patches+=("$here/patches/$name")
done

is_git=0
if git -C "$mdir" rev-parse --show-toplevel >/dev/null 2>&1 \
   && [[ $(git -C "$mdir" rev-parse --show-toplevel) == "$mdir" ]]; then
  is_git=1
fi

if (( ! force )); then
  if (( is_git )); then
    head=$(git -C "$mdir" rev-parse HEAD)
    if [[ $head != "$ref_sha" ]]; then
      echo "apply_patches.sh: $mdir is at $head, but the series is pinned to $ref_tag ($ref_sha)." >&2
      echo "  Check out the pinned ref (git -C $mdir checkout $ref_tag) or pass --force." >&2
      exit 1
    fi
  else
    version=$(python3 - "$mdir" <<'EOF'
import re, sys
text = open(sys.argv[1] + "/megatron/core/package_info.py").read()
print(".".join(re.search(rf"^{k} = (\d+)", text, re.M).group(1) for k in ("MAJOR", "MINOR", "PATCH")))
EOF
)
    case $version in
      0.19.0|0.19.1|0.19.2) ;;
      *) echo "apply_patches.sh: $mdir holds megatron-core $version; the series needs 0.19.0-0.19.2 ($ref_tag). Pass --force to try anyway." >&2; exit 1 ;;
    esac
  fi
fi

# Run git apply inside MEGATRON_DIR only: for a plain tree, stop git from finding an enclosing
# repository (it would then resolve paths against that repository's root).
gapply() {
  (cd "$mdir" && GIT_CEILING_DIRECTORIES=$(dirname "$mdir") git apply "$@")
}

reversed=()
for (( i=${#patches[@]}-1; i>=0; i-- )); do reversed+=("${patches[i]}"); done

applied=0
gapply --check --reverse "${reversed[@]}" >/dev/null 2>&1 && applied=1

case $mode in
  revert)
    if (( ! applied )); then echo "apply_patches.sh: the series is not (fully) applied to $mdir; nothing reverted" >&2; exit 1; fi
    gapply --reverse "${reversed[@]}"
    echo "reverted ${#patches[@]} patches from $mdir"
    exit 0 ;;
esac

if (( applied )); then
  echo "already applied: ${#patches[@]} patches of $ref_tag in $mdir"
  exit 0
fi

if ! gapply --check "${patches[@]}" 2>/dev/null; then
  # Find the first patch that does not apply on top of its predecessors and say why.
  for (( i=0; i<${#patches[@]}; i++ )); do
    if ! err=$(gapply --check "${patches[@]:0:i+1}" 2>&1); then
      echo "apply_patches.sh: patch '$(basename "${patches[i]}")' does not apply to $mdir:" >&2
      printf '  %s\n' "${err//$'\n'/$'\n'  }" >&2
      echo "  Nothing was changed." >&2
      exit 1
    fi
  done
  echo "apply_patches.sh: the series does not apply to $mdir (partially applied already?). Nothing was changed." >&2
  exit 1
fi

if [[ $mode == check ]]; then
  echo "ok: ${#patches[@]} patches apply cleanly to $mdir"
  exit 0
fi
gapply "${patches[@]}"
echo "applied ${#patches[@]} patches of $ref_tag to $mdir"
