#!/usr/bin/env bash
# A/B timing on the GPU machine: builds several source trees side by side for
# sm_90 and runs `python -m qattn bench` on each in turn, ROUNDS times, so all
# see the same card, clocks and neighbours. A tree is "." (this one) or a folder
# holding another tree, e.g. `git archive OLD | tar -x -C .base && echo OLD
# >.base/.commit` carried to the machine (.commit names it in the logs and the
# JSON). Logs and JSON go to $OUT, one pair per tree and round.
#
#   scripts/compare_bench.sh CASES ROUNDS TREE...      e.g. D1,D16,P2k,70B 2 .base .
#
# QATTN_NEW_BUILD: a build folder of "." made already (gpu_check.sh's). Another
# tree builds into TREE/build-ab unless that holds a libqattn.so already (made by
# gpu_check.sh's stage exp, with its tests). Every tree cycles the same number of
# layers, QATTN_AB_LAYERS (default 22: each loop 3x an H200's L2 at one decode row).
set -u
cd "$(dirname "$0")/.."
CASES=$1
ROUNDS=$2
shift 2
TREES=("$@")
OUT=${OUT:-$PWD/compare_out}
mkdir -p "$OUT"

build_dir() { [[ $1 == . ]] && echo "${QATTN_NEW_BUILD:-$PWD/build-new}" || echo "$PWD/$1/build-ab"; }
label() {
    if [[ $1 == . ]]; then echo "${QATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo this)}"
    else cat "$1/.commit" 2>/dev/null || echo "$1"; fi
}
log_name() { [[ $1 == . ]] && echo new || basename "$1"; }

pending=()
for tree in "${TREES[@]}"; do [[ -f $(build_dir "$tree")/libqattn.so ]] || pending+=("$tree"); done
if ((${#pending[@]})); then
    jobs=$(($(nproc) / ${#pending[@]}))
    pids=()
    for tree in "${pending[@]}"; do
        dir=$(build_dir "$tree")
        (cmake -S "$tree" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQATTN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DQATTN_BUILD_TESTS=OFF && cmake --build "$dir" -j "$((jobs > 0 ? jobs : 1))") \
            >"$OUT/build-$(log_name "$tree").log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { echo "build of ${pending[$i]} failed"; tail -30 "$OUT/build-$(log_name "${pending[$i]}").log"; exit 1; }
    done
fi

export PYTHONUNBUFFERED=1
for round in $(seq "$ROUNDS"); do
    for tree in "${TREES[@]}"; do
        name=$(log_name "$tree")
        echo "== round $round: $name ($(label "$tree"))"
        QATTN_COMMIT="$(label "$tree")" QATTN_LIBRARY="$(build_dir "$tree")/libqattn.so" \
            PYTHONPATH="$tree/bindings/python" \
            python3 -m qattn bench --cases "$CASES" --layers "${QATTN_AB_LAYERS:-22}" \
            --json "$OUT/$name-$round.json" --plot "/tmp/compare-$name.png" \
            >"$OUT/$name-$round.log" 2>&1
        grep -E "^(D1|D16|70B|P2k)|projections" "$OUT/$name-$round.log"
    done
done
