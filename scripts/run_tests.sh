#!/usr/bin/env bash
# The test command of qattn (README: "Test it"). On a fresh machine it installs
# what it needs, then:
#   1. builds the library and the GoogleTest suite with CMake and runs ctest;
#   2. installs the library to a temporary prefix, builds examples/ against it
#      through find_package(qattn) and runs the example;
#   3. installs the Python package (`pip install .`) and runs pytest on it;
#   4. runs `python -m qattn check` with the installed package.
# The CUDA backend is built when nvcc is found (cuBLAS comes from the
# nvidia-cublas wheel); its tests run only where a GPU is present.
#
# Environment (all optional):
#   QATTN_CUDA                 AUTO (default: ON when nvcc is found), ON or OFF
#   CMAKE_CUDA_ARCHITECTURES   e.g. "80" to compile one architecture (default: the project's)
#   QATTN_GTEST_SOURCE_DIR     GoogleTest sources to build instead of a system GoogleTest
#   QATTN_TEST_BUILD_DIR       CMake build folder (default: build-tests-run)
#   PYTHON                     interpreter to use (default: python3)
#   QATTN_PYTEST_ARGS          extra pytest arguments
# Exits non-zero when any step fails; pytest finding no tests is a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
BUILD=${QATTN_TEST_BUILD_DIR:-$ROOT/build-tests-run}
JOBS=$(nproc 2>/dev/null || echo 2)
START=$SECONDS
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore}  # CI runs as root

step() { printf '\n==== [%4ds] %s\n' $((SECONDS - START)) "$*"; }
die() { echo "run_tests.sh: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

# ---- 0. tools and packages --------------------------------------------------------
step "Python packages"
"$PYTHON" -m pip install --quiet "torch==2.13.0" numpy pytest transformers safetensors

# cmake >= 3.24 and ninja: from pip when the system lacks them.
cmake_ok() {
    command -v cmake >/dev/null || return 1
    local v
    v=$(cmake --version | head -1 | awk '{print $3}')
    [ "$(printf '%s\n3.24\n' "$v" | sort -V | head -1)" = 3.24 ]
}
cmake_ok || "$PYTHON" -m pip install --quiet "cmake>=3.24"
command -v ninja >/dev/null || "$PYTHON" -m pip install --quiet ninja
hash -r
cmake_ok || die "cmake >= 3.24 not found on PATH after installing it with pip"

# CUDA: ON when nvcc is there (or forced), with cuBLAS from the nvidia-cublas wheel.
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
CUDA_MODE=${QATTN_CUDA:-AUTO}
case "$CUDA_MODE" in
    AUTO) if [ -n "$NVCC" ]; then CUDA_MODE=ON; else CUDA_MODE=OFF; fi ;;
    ON | OFF) ;;
    *) die "QATTN_CUDA must be AUTO, ON or OFF, not '$CUDA_MODE'" ;;
esac
CMAKE_ARGS_COMMON=(-DQATTN_CUDA="$CUDA_MODE")
if [ "$CUDA_MODE" = ON ]; then
    [ -n "$NVCC" ] || die "QATTN_CUDA=ON but nvcc was not found"
    export CUDACXX=${CUDACXX:-$NVCC}
    step "cuBLAS (nvidia-cublas wheel)"
    # cuBLAS of nvcc's CUDA major: CUDA 13's wheel is nvidia-cublas 13.x, CUDA 12's nvidia-cublas-cu12.
    CUDA_MAJOR=$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    if [ "$CUDA_MAJOR" = 12 ]; then CUBLAS_WHEEL=nvidia-cublas-cu12; else CUBLAS_WHEEL="nvidia-cublas>=$CUDA_MAJOR,<$((CUDA_MAJOR + 1))"; fi
    "$PYTHON" -m pip install --quiet "$CUBLAS_WHEEL"
    if [ -z "${QATTN_CUBLAS_ROOT:-}" ]; then
        # The wheel's folder is nvidia/cu13 (CUDA 13) or nvidia/cublas (CUDA 12):
        # a namespace package, so look through its __path__.
        QATTN_CUBLAS_ROOT=$("$PYTHON" - <<'EOF'
import importlib, os
for name in ("nvidia.cu13", "nvidia.cublas"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    for folder in module.__path__:
        if os.path.isfile(os.path.join(folder, "include", "cublas_v2.h")):
            print(folder)
            raise SystemExit
EOF
)
    fi
    [ -n "$QATTN_CUBLAS_ROOT" ] || die "cuBLAS headers not found in the nvidia-cublas wheel"
    export QATTN_CUBLAS_ROOT  # pip's isolated build reads it from the environment
    echo "QATTN_CUBLAS_ROOT=$QATTN_CUBLAS_ROOT"
    CMAKE_ARGS_COMMON+=(-DQATTN_CUBLAS_ROOT="$QATTN_CUBLAS_ROOT")
    if [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
        CMAKE_ARGS_COMMON+=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")
    fi
fi

# GoogleTest: the system's, else sources given or found, else libgtest-dev from apt.
have_system_gtest() {
    local d
    for d in /usr/lib/cmake/GTest /usr/lib/*/cmake/GTest /usr/local/lib/cmake/GTest /usr/local/lib/*/cmake/GTest; do
        [ -f "$d/GTestConfig.cmake" ] && return 0
    done
    return 1
}
GTEST_ARGS=()
if [ -n "${QATTN_GTEST_SOURCE_DIR:-}" ]; then
    GTEST_ARGS=(-DQATTN_GTEST_SOURCE_DIR="$QATTN_GTEST_SOURCE_DIR")
elif ! have_system_gtest; then
    if [ -f /usr/src/googletest/CMakeLists.txt ]; then
        GTEST_ARGS=(-DQATTN_GTEST_SOURCE_DIR=/usr/src/googletest)
    else
        step "GoogleTest (apt: libgtest-dev)"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgtest-dev
        have_system_gtest || GTEST_ARGS=(-DQATTN_GTEST_SOURCE_DIR=/usr/src/googletest)
    fi
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# ---- 1. library + GoogleTest -----------------------------------------------------
step "CMake build (CUDA backend: $CUDA_MODE) in $BUILD"
cmake -S . -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DQATTN_BUILD_TESTS=ON \
    "${CMAKE_ARGS_COMMON[@]}" "${GTEST_ARGS[@]}"
cmake --build "$BUILD" -j "$JOBS"

step "GoogleTest (ctest)"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"

# ---- 2. install + example ------------------------------------------------------------
PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/qattn-prefix.XXXXXX")
trap 'rm -rf "$PREFIX"' EXIT
step "install to $PREFIX and build examples/ against it"
cmake --install "$BUILD" --prefix "$PREFIX"
[ -f "$PREFIX/lib/cmake/qattn/qattnConfig.cmake" ] || [ -f "$PREFIX/lib64/cmake/qattn/qattnConfig.cmake" ] ||
    die "the install has no qattnConfig.cmake"
cmake -S examples -B "$PREFIX/example-build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX"
cmake --build "$PREFIX/example-build"
"$PREFIX/example-build/attention_block" gptq
"$PREFIX/example-build/attention_block" dense

# ---- 3. Python package + pytest ----------------------------------------------------------
step "pip install . (scikit-build-core; CUDA backend: $CUDA_MODE)"
PIP_CONFIG=(-C cmake.define.QATTN_CUDA="$CUDA_MODE")
if [ "$CUDA_MODE" = ON ] && [ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then
    PIP_CONFIG+=(-C cmake.define.CMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")
fi
"$PYTHON" -m pip install "${PIP_CONFIG[@]}" .

step "pytest against the installed package"
# Run from outside the source tree so that `import qattn` finds the installed
# package (with its libqattn.so), not bindings/python.
(cd "$PREFIX" && env -u QATTN_LIBRARY "$PYTHON" -c "import qattn; print('testing', qattn.__file__, 'with', qattn.library_path())")
PYTEST_STATUS=0
(cd "$PREFIX" && env -u QATTN_LIBRARY "$PYTHON" -m pytest "$ROOT/tests" -p no:cacheprovider ${QATTN_PYTEST_ARGS:-}) ||
    PYTEST_STATUS=$?
if [ "$PYTEST_STATUS" = 5 ]; then die "pytest collected no tests"; fi
[ "$PYTEST_STATUS" = 0 ] || die "pytest failed (exit $PYTEST_STATUS)"

step "python -m qattn check (the README's run command)"
(cd "$PREFIX" && env -u QATTN_LIBRARY "$PYTHON" -m qattn check)
step "all tests passed"
