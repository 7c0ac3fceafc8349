#!/usr/bin/env bash
# Builds qattn for sm_90 with every core, then runs on the GPU machine: the whole
# pytest suite (CUDA cases included), the GoogleTest binary, compute-sanitizer
# memcheck and racecheck on it, `python -m qattn bench` and the backend timing
# script. Logs go to $OUT (or ./gpu_check_out), one file per stage (at most 8,
# what the device tool brings back); a summary is printed last.
#
#   scripts/gpu_check.sh [stage ...]    stages: build pytest gtest sanitizer bench timing ab exp
#                                       (default: all but timing, ab and exp)
#
# ab: A/B timing of this build against the source tree in $QATTN_AB_BASE (e.g.
# `git archive OLD | tar -x -C .base && echo OLD >.base/.commit`, carried),
# scripts/compare_bench.sh with cases $QATTN_AB_CASES (default D1,D16,P2k,70B),
# two rounds, logs in $OUT/ab.
# exp: candidate trees, every folder in .exp (made like .base, carried): each
# is built with its tests, which run on CUDA (its CUDA test files, $QATTN_EXP_TESTS,
# and its GoogleTest binary); then all of them, this build and .base (if there)
# are timed as in ab. Logs in $OUT/exp. Several changes that never ran on a GPU
# are judged in one call of the device tool this way.
#
# QATTN_COMMIT=<hash> names the tree in the logs and the bench's JSON: the copy
# of .git on the GPU machine can be older than the working tree sent there.
#
# GoogleTest sources: .deps/googletest when present (carried to machines without
# them; copy /usr/src/googletest there), else the system package.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUILD=${QATTN_GPU_BUILD:-build-gpu}
STAGES=${*:-build pytest gtest sanitizer bench}
JOBS=$(nproc)
SUMMARY=()
: >"$LOG"

note() { echo "== $*" | tee -a "$LOG"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }
# run NAME LIMIT_S CMD...: output to $OUT/NAME.log (and its tail to the main log)
run() {
    local name=$1 limit=$2
    shift 2
    note "$name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log" >>"$LOG"
    note "$name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

CARD=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
COMMIT=${QATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export QATTN_COMMIT=$COMMIT  # the bench's JSON names it too
note "card: ${CARD:-none}; commit: $COMMIT; date: $(date -u +%FT%TZ)"

# The GPU machine has no network: Python packages it lacks travel as wheels in
# .whl (see docs/GPU.md) and are installed only where the import fails.
if [[ -d .whl ]]; then
    missing=()
    python3 -c "import pytest" 2>/dev/null || missing+=(.whl/pytest-* .whl/pluggy-* .whl/iniconfig-* .whl/pygments-*)
    python3 -c "import matplotlib" 2>/dev/null || missing+=(.whl/matplotlib-* .whl/contourpy-* .whl/cycler-* \
        .whl/fonttools-* .whl/kiwisolver-* .whl/pyparsing-* .whl/python_dateutil-*)
    if ((${#missing[@]})); then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/qattn-site "${missing[@]}" >>"$LOG" 2>&1
        export PYTHONPATH="/tmp/qattn-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

if want build; then
    # --clean-first: build folders can outlive a call on the device machine, and
    # copied sources may carry older timestamps than objects built there before.
    GTEST_ARGS=()
    [[ -d .deps/googletest ]] && GTEST_ARGS=(-DQATTN_GTEST_SOURCE_DIR="$PWD/.deps/googletest")
    if run build 600 bash -c 'cmake -S . -B "$0" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQATTN_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DQATTN_BUILD_TESTS=ON "${@:2}" && cmake --build "$0" -j "$1" --clean-first' \
        "$BUILD" "$JOBS" "${GTEST_ARGS[@]}"; then
        SUMMARY+=("build: ok")
    else
        SUMMARY+=("build: FAILED (see build.log)")
    fi
fi

export QATTN_LIBRARY="$PWD/$BUILD/libqattn.so"
export PYTHONPATH="$PWD/bindings/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
GTEST_BIN="$BUILD/cpp_tests/qattn_tests"

if want pytest; then
    # shellcheck disable=SC2086  # QATTN_PYTEST_ARGS may name several files or options
    run pytest 900 python3 -m pytest ${QATTN_PYTEST_ARGS:-tests} -q -rs -p no:cacheprovider
    SUMMARY+=("pytest: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)")
fi

if want gtest; then
    if [[ -x $GTEST_BIN ]]; then
        run gtest 600 "$GTEST_BIN"
        SUMMARY+=("gtest: $(grep -E '^\[  (PASSED|FAILED)  \]|tests? ran' "$OUT/gtest.log" | tr '\n' ' ')")
    else
        SUMMARY+=("gtest: not built")
    fi
fi

if want sanitizer; then
    if [[ -x $GTEST_BIN ]]; then
        # racecheck instruments shared memory and is slow: it runs the CUDA cases only.
        run sanitizer 900 bash -c 'compute-sanitizer --tool memcheck --error-exitcode 9 "$0" && \
            compute-sanitizer --tool racecheck --error-exitcode 9 "$0" --gtest_filter="*cuda*"' "$GTEST_BIN"
        SUMMARY+=("compute-sanitizer memcheck + racecheck: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' \
            "$OUT/sanitizer.log" | tr '\n' ' '))")
    else
        SUMMARY+=("compute-sanitizer: skipped (no gtest binary)")
    fi
fi

if want bench; then
    if [[ -f bindings/python/qattn/bench.py ]]; then
        run bench 600 python3 -m qattn bench --json "$OUT/bench.json" --plot "$OUT/bench.png"
        SUMMARY+=("qattn bench: exit $?")
    else
        SUMMARY+=("qattn bench: not present")
    fi
fi

if want timing; then
    run timing 500 python3 scripts/cuda_timing.py --profile
    SUMMARY+=("timing: exit $? (table below)")
fi

if want ab; then
    run ab 600 env QATTN_NEW_BUILD="$PWD/$BUILD" OUT="$OUT/ab" bash scripts/compare_bench.sh \
        "${QATTN_AB_CASES:-D1,D16,P2k,70B}" 2 "${QATTN_AB_BASE:-.base}" .
    SUMMARY+=("ab: exit $? (ab.log)")
fi

if want exp; then
    EXP_TESTS=${QATTN_EXP_TESTS:-"test_cuda_backend.py test_forward.py test_block.py test_lora.py \
test_kv_destination.py test_hf_parity.py test_scratch.py"}
    mkdir -p "$OUT/exp"
    trees=()
    for tree in .exp/*/; do
        tree=${tree%/}
        [[ -f $tree/CMakeLists.txt ]] || continue
        name=$(basename "$tree")
        GTEST_ARGS=()
        [[ -d .deps/googletest ]] && GTEST_ARGS=(-DQATTN_GTEST_SOURCE_DIR="$PWD/.deps/googletest")
        if ! run "exp-$name-build" 600 bash -c 'cmake -S "$0" -B "$0/build-ab" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DQATTN_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DQATTN_BUILD_TESTS=ON "${@:2}" && \
            cmake --build "$0/build-ab" -j "$1" --clean-first' "$tree" "$JOBS" "${GTEST_ARGS[@]}"; then
            SUMMARY+=("exp $name ($(cat "$tree/.commit" 2>/dev/null)): build FAILED")
            continue
        fi
        files=()
        for f in $EXP_TESTS; do [[ -f $tree/tests/$f ]] && files+=("$tree/tests/$f"); done  # a candidate's own tests too
        run "exp-$name-pytest" 900 env QATTN_LIBRARY="$PWD/$tree/build-ab/libqattn.so" \
            PYTHONPATH="$PWD/$tree/bindings/python${PYTHONPATH:+:$PYTHONPATH}" \
            python3 -m pytest "${files[@]}" -q -rs -p no:cacheprovider
        pytest_rc=$?
        run "exp-$name-gtest" 600 "$tree/build-ab/cpp_tests/qattn_tests"
        gtest_rc=$?
        # A candidate whose tests fail is not timed: its numbers would mean nothing.
        timed="timed"
        ((pytest_rc == 0 && gtest_rc == 0)) || timed="NOT timed (tests failed)"
        SUMMARY+=("exp $name ($(cat "$tree/.commit" 2>/dev/null)): pytest: $(grep -E \
            '(passed|failed|error).* in [0-9.]+s' "$OUT/exp-$name-pytest.log" | tail -n 1); gtest: $(grep -E \
            '^\[  (PASSED|FAILED)  \]' "$OUT/exp-$name-gtest.log" | tr '\n' ' '); $timed")
        mv "$OUT"/exp-"$name"-*.log "$OUT/exp/"
        [[ $timed == timed ]] && trees+=("$tree")
    done
    base=()
    [[ -f .base/CMakeLists.txt ]] && base=(.base)
    run exp-bench 600 env QATTN_NEW_BUILD="$PWD/$BUILD" OUT="$OUT/exp" bash scripts/compare_bench.sh \
        "${QATTN_AB_CASES:-D1,D16,P2k,70B}" 2 "${base[@]}" . "${trees[@]}"
    SUMMARY+=("exp bench: exit $? (exp-bench.log)")
fi

note "summary (card: ${CARD:-none}, commit: $COMMIT)"
for line in "${SUMMARY[@]}"; do echo "   $line" | tee -a "$LOG"; done
if want timing; then grep -E "^(card|floors|case|D[0-9]|P[0-9])" "$OUT/timing.log"; fi
