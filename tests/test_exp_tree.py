"""scripts/exp_tree.sh, which makes the candidate trees that gpu_check.sh's stage
exp builds, tests and times: HEAD with named commits reverted, in .exp/NAME."""
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "exp_tree.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A repository whose history has a change landed taken out again (a variant on top of it)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "exp_tree.sh")
    (root / ".gitignore").write_text("/.exp/\n/.base/\n")
    _git(tmp_path, "init", "-q", str(root))
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "t")
    kernel = root / "kernel.cu"
    kernel.write_text("plain\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "base")
    kernel.write_text("candidate\n")
    _git(root, "commit", "-qam", "candidate")
    kernel.write_text("candidate variant\n")
    _git(root, "commit", "-qam", "variant")
    kernel.write_text("plain\n")
    _git(root, "commit", "-qam", "take both out")
    (root / "later.txt").write_text("work after the take-out\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "later")
    return root


def _run(repo, *args):
    return subprocess.run(["bash", str(repo / "scripts" / "exp_tree.sh"), *args], capture_output=True, text=True)


def test_reverting_the_take_out_brings_the_candidate_back(repo):
    take_out, variant = _git(repo, "rev-parse", "--short", "HEAD~1"), _git(repo, "rev-parse", "--short", "HEAD~2")
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert _run(repo, "both", take_out).returncode == 0
    assert (repo / ".exp/both/kernel.cu").read_text() == "candidate variant\n"
    assert (repo / ".exp/both/later.txt").exists()  # the rest of HEAD is there
    assert (repo / ".exp/both/.commit").read_text().strip() == "%s-revert(%s)" % (head, take_out)
    # Reverting the variant's own commit after that leaves the first candidate.
    assert _run(repo, "first", take_out, variant).returncode == 0
    assert (repo / ".exp/first/kernel.cu").read_text() == "candidate\n"
    # The working tree, the branch and the worktree list are as before.
    assert (repo / "kernel.cu").read_text() == "plain\n"
    assert _git(repo, "rev-parse", "--short", "HEAD") == head
    assert _git(repo, "status", "--porcelain") == ""
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_base_is_head_and_bad_reverts_fail_clearly(repo):
    assert _run(repo, "--base").returncode == 0
    assert (repo / ".base/kernel.cu").read_text() == "plain\n"
    assert (repo / ".base/.commit").read_text().strip() == _git(repo, "rev-parse", "--short", "HEAD")
    # The variant alone does not revert on HEAD (its change was taken out already).
    variant = _git(repo, "rev-parse", "--short", "HEAD~2")
    failed = _run(repo, "bad", variant)
    assert failed.returncode != 0 and "does not apply cleanly" in failed.stderr
    assert not (repo / ".exp/bad").exists()
    assert _run(repo, "none").returncode == 2
