#!/usr/bin/env bash
# Makes a candidate source tree for gpu_check.sh's stage exp: .exp/NAME holds
# HEAD with the named commits reverted in order (a change that never ran on a
# GPU lands taken out again, and reverting the commit that took it out brings
# it back; reverting a variant's own commit after that leaves the variant out).
# .exp/NAME/.commit names it in the logs. The .exp folder is git-ignored; carry
# it to the GPU machine (the device tool's carry list).
#
#   scripts/exp_tree.sh NAME COMMIT...      e.g. scripts/exp_tree.sh head-rows e170ec7
#   scripts/exp_tree.sh --base              .base = HEAD itself, the baseline of stage ab
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --base ]]; then
    rm -rf .base && mkdir -p .base
    git archive HEAD | tar -x -C .base
    git rev-parse --short HEAD >.base/.commit
    echo ".base: $(cat .base/.commit)"
    exit 0
fi
NAME=${1:?usage: exp_tree.sh NAME COMMIT... | --base}
shift
(($#)) || { echo "exp_tree.sh: name the commits to revert" >&2; exit 2; }
work=$(mktemp -d)
trap 'git worktree remove --force "$work" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach --quiet "$work" HEAD
for commit in "$@"; do
    git -C "$work" revert --no-commit "$commit" || {
        echo "exp_tree.sh: reverting $commit on HEAD does not apply cleanly" >&2
        exit 1
    }
done
rm -rf ".exp/$NAME" && mkdir -p ".exp/$NAME"
# revert --no-commit leaves the result in the index: archive that tree.
git archive "$(git -C "$work" write-tree)" | tar -x -C ".exp/$NAME"
reverted=$(for c in "$@"; do git rev-parse --short "$c"; done | paste -sd, -)
echo "$(git rev-parse --short HEAD)-revert($reverted)" >".exp/$NAME/.commit"
echo ".exp/$NAME: $(cat ".exp/$NAME/.commit")"
