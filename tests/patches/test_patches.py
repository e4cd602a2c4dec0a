"""The patch series: applies to the pinned wheel's files, is idempotent and all-or-nothing."""

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATCHES = REPO / "patches"
SERIES = [line.strip() for line in (PATCHES / "series").read_text().splitlines() if line.strip()]
TOUCHED = sorted({m for p in SERIES for m in re.findall(r"^\+\+\+ b/(\S+)",
                                                        (PATCHES / p).read_text(), re.M)})


def wheel_root() -> Path:
    spec = importlib.util.find_spec("megatron.core")
    return Path(spec.origin).parents[2]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tree(tmp_path):
    """A minimal copy of the wheel's megatron/ tree: the patched files and package_info."""
    root = tmp_path / "mtree"
    for rel in TOUCHED + ["megatron/core/package_info.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel_root() / rel, root / rel)
    return root


def apply(*args):
    return subprocess.run(["bash", str(REPO / "scripts" / "apply_patches.sh"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_series_lists_every_patch_and_names_follow_the_convention():
    on_disk = sorted(p.name for p in PATCHES.glob("*.patch"))
    assert sorted(SERIES) == on_disk
    for name in SERIES:
        text = (PATCHES / name).read_text()
        assert re.fullmatch(r"[a-z]+_[a-z0-9_]+\.patch", name)
        assert f"Subject: [PATCH] {name[:-6]}\n" in text
        assert "Reason: hook-call-site" in text and "Megatron-Ref: core_v0.19.0" in text


def test_wheel_files_are_the_pinned_tag_blobs():
    """The 'index' line where a file first appears in the series is its git blob id at
    core_v0.19.0, so matching it proves the wheel's file is byte-identical to the tag's."""
    seen = set()
    for name in SERIES:
        text = (PATCHES / name).read_text()
        for path, blob in re.findall(r"^diff --git a/(\S+) .*\nindex ([0-9a-f]+)\.\.", text, re.M):
            if path in seen:
                continue  # later patches are relative to the earlier ones
            seen.add(path)
            data = (wheel_root() / path).read_bytes()
            git_blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            assert git_blob.startswith(blob), f"{path} in the wheel is not the pinned blob"
    assert seen == set(TOUCHED)


def test_hunks_only_add_lines():
    for name in SERIES:
        body = (PATCHES / name).read_text().split("\ndiff --git", 1)[1]
        removed = [ln for ln in body.splitlines() if ln.startswith("-") and not ln.startswith("---")]
        assert not removed, f"{name} removes Megatron lines: {removed}"


def test_apply_is_idempotent_and_reversible(tree):
    before = {rel: sha(tree / rel) for rel in TOUCHED}
    first = apply(tree)
    assert first.returncode == 0 and f"applied {len(SERIES)} patches" in first.stdout, first.stderr
    assert all(sha(tree / rel) != before[rel] for rel in TOUCHED)
    second = apply(tree)
    assert second.returncode == 0 and "already applied" in second.stdout
    reverted = apply("--revert", tree)
    assert reverted.returncode == 0, reverted.stderr
    assert {rel: sha(tree / rel) for rel in TOUCHED} == before


def test_rejected_hunk_names_patch_and_file_and_changes_nothing(tree):
    training = tree / "megatron/training/training.py"
    text = training.read_text()
    training.write_text(text.replace("            ft_integration.on_training_step_start()\n",
                                     "            ft_integration.on_training_step_begin()\n"))
    before = {rel: sha(tree / rel) for rel in TOUCHED}
    out = apply(tree)
    assert out.returncode == 1
    assert "training_call_moetion_step_hooks.patch" in out.stderr
    assert "megatron/training/training.py" in out.stderr
    assert "Nothing was changed" in out.stderr
    assert {rel: sha(tree / rel) for rel in TOUCHED} == before


def test_wrong_megatron_version_is_refused(tree):
    info = tree / "megatron/core/package_info.py"
    info.write_text(re.sub(r"^MINOR = \d+", "MINOR = 18", info.read_text(), flags=re.M))
    out = apply(tree)
    assert out.returncode == 1 and "megatron-core 0.18.2" in out.stderr
    assert apply("--check", "--force", tree).returncode == 0


def test_git_checkout_at_another_commit_is_refused(tree):
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    subprocess.run(["git", "-C", str(tree), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "x"], check=True)
    out = apply(tree)
    assert out.returncode == 1 and "pinned to core_v0.19.0" in out.stderr


def test_bad_usage():
    assert apply().returncode == 2
    assert apply("--bogus", "/tmp").returncode == 2
    assert "has no megatron/" in apply("/").stderr


@pytest.mark.megatron
def test_check_patches_builds_and_imports_the_patched_tree(tmp_path):
    out = subprocess.run(["bash", str(REPO / "scripts" / "check_patches.sh"), str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "hook wiring ok" in out.stdout and "check-patches: ok" in out.stdout
