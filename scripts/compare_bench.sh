#!/usr/bin/env bash
# A/B timing on the GPU machine: builds this tree and a baseline source tree
# (e.g. `git archive OLD | tar -x -C .base && echo OLD >.base/.commit`, carried to
# the machine; .commit names it in the JSON) side by side
# for sm_90, then runs `python -m qattn bench` on each in turn, ROUNDS times, so
# both see the same card, clocks and neighbours. Logs and JSON go to $OUT.
#
#   scripts/compare_bench.sh BASE_DIR [CASES] [ROUNDS]     (CASES default D1,D16,70B)
#
# QATTN_NEW_BUILD: a build folder of this tree made already (gpu_check.sh's), used
# instead of building this tree again. Both sides cycle the same number of layers,
# QATTN_AB_LAYERS (default 22: each loop 3x an H200's L2 at one decode row).
set -u
cd "$(dirname "$0")/.."
BASE=$1
CASES=${2:-D1,D16,70B}
ROUNDS=${3:-2}
OUT=${OUT:-$PWD/compare_out}
mkdir -p "$OUT"
JOBS=$(( $(nproc) / 2 ))
build() {  # build SOURCE_DIR BUILD_DIR
    cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQATTN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DQATTN_BUILD_TESTS=OFF >/dev/null && cmake --build "$2" -j "$JOBS" >/dev/null
}
NEW_BUILD=${QATTN_NEW_BUILD:-$PWD/build-new}
build "$BASE" "$PWD/build-base" >"$OUT/build-base.log" 2>&1 &
if [[ -z ${QATTN_NEW_BUILD:-} ]]; then
    build . "$NEW_BUILD" >"$OUT/build-new.log" 2>&1 || { echo "build of this tree failed"; tail -30 "$OUT/build-new.log"; exit 1; }
fi
wait $! || { echo "build of $BASE failed"; tail -30 "$OUT/build-base.log"; exit 1; }
export PYTHONUNBUFFERED=1
for round in $(seq "$ROUNDS"); do
    for side in base new; do
        src=$([[ $side == base ]] && echo "$BASE" || echo .)
        echo "== round $round: $side"
        lib=$([[ $side == base ]] && echo "$PWD/build-base" || echo "$NEW_BUILD")/libqattn.so
        commit=${QATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
        [[ $side == base ]] && commit=$(cat "$BASE/.commit" 2>/dev/null || echo "unknown ($BASE)")
        QATTN_COMMIT="$commit" QATTN_LIBRARY="$lib" PYTHONPATH="$src/bindings/python" \
            python3 -m qattn bench --cases "$CASES" --layers "${QATTN_AB_LAYERS:-22}" \
            --json "$OUT/$side-$round.json" --plot /tmp/compare.png \
            >"$OUT/$side-$round.log" 2>&1
        grep -E "^(D1|D16|70B|P2k)|projections" "$OUT/$side-$round.log"
    done
done
