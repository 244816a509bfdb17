#!/usr/bin/env bash
# Build the CPU kernels (csrc/cpu, csrc/cpu_linear.cpp) with AddressSanitizer + UndefinedBehavior-
# Sanitizer into a separate extension dir and run the CPU kernel, attention, post-op and FFN tests against
# that build.
# Any sanitizer report aborts the run (non-zero exit). Usage: scripts/asan_cpu.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${SPARSE_OFA_ASAN_DIR:-/tmp/sparse_ofa_asan_build}
mkdir -p "$BUILD_DIR"
export TORCH_EXTENSIONS_DIR="$BUILD_DIR"           # never mixes with the normal cached build
export SPARSE_OFA_CPU_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
export SPARSE_OFA_CPU_LDFLAGS="-fsanitize=address,undefined"
# python and torch are not sanitized: the runtime must be preloaded, leaks of the interpreter ignored
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
CC=${CXX:-g++}
PRELOAD="$($CC -print-file-name=libasan.so) $($CC -print-file-name=libubsan.so)"

echo "== building the sanitized extension in $BUILD_DIR"
LD_PRELOAD="$PRELOAD" python -c "from sparse_ofa.backends import cpu; cpu.load(); print('isa:', cpu.best_isa())"
echo "== running the CPU kernel tests under ASan + UBSan"
LD_PRELOAD="$PRELOAD" python -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py tests/test_cpu_attention.py \
  tests/test_cpu_attention_bf16.py tests/test_cpu_postops.py tests/test_cpu_ffn.py tests/test_cpu_dense.py "$@"
