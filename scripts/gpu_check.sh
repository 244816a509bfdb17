#!/usr/bin/env bash
# GPU checks for sparse_ofa's Triton and CUDA kernels, run from the repository root on a CUDA machine
# (no network needed). Writes logs, pytest-benchmark JSON and the speedup table under $OUT.
#
#   scripts/gpu_check.sh [env|tests|sanitize|bench|bench-full|all]     (default: all but bench-full)
#
#   env        device, driver, torch/triton versions, SM count -> $OUT/env.txt
#   tests      exactness tests on the device (tests/test_gpu_*.py, the Triton tests compiled for the
#              GPU, the nvcc compile check) -> $OUT/tests.log, $OUT/tests_junit.xml
#   sanitize   compute-sanitizer memcheck + racecheck + synccheck on the CUDA 2:4 kernel, memcheck on
#              the Triton kernels -> $OUT/sanitize_*.log
#   bench      bench/test_layers_gpu.py, BERT-base shapes -> $OUT/bench_gpu.json, $OUT/bench_table.txt
#   bench-full the same with BERT-large shapes too (SPARSE_OFA_BENCH_FULL=1)
# Each stage fits in a 10-minute command on an H100/H200 when run alone; `all` may not.
set -uo pipefail

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests sanitize bench)
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/sparse_ofa_torch_extensions}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
STATUS=0

log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

install_package() {
  # The package maps kernels/ to sparse_ofa.kernels, so it must be installed (editable), not just
  # put on PYTHONPATH. No network: no dependencies, no build isolation.
  if "$PY" -c "import sparse_ofa.kernels, sys; sys.exit(0 if sparse_ofa.__file__.startswith('$REPO') else 1)" 2>/dev/null; then
    return 0
  fi
  if "$PY" -m pip install -e . --no-deps --no-build-isolation -q >"$OUT/pip.log" 2>&1; then
    return 0
  fi
  # Fallback: a shadow tree with the package layout setuptools would install.
  local shim="${TMPDIR:-/tmp}/sparse_ofa_shim"
  rm -rf "$shim" && mkdir -p "$shim"
  cp -r sparse_ofa "$shim/sparse_ofa" && cp -r kernels "$shim/sparse_ofa/kernels" && cp -r csrc "$shim/sparse_ofa/csrc"
  export PYTHONPATH="$shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  log "pip install -e failed (see pip.log); using a shadow tree on PYTHONPATH"
}

stage_env() {
  {
    date -u
    nvidia-smi || true
    "$PY" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
      "memory GiB", round(p.total_memory / 2**30, 1))
EOF
    which nvcc compute-sanitizer cuobjdump 2>/dev/null
    nvcc --version 2>/dev/null | tail -2
  } >"$OUT/env.txt" 2>&1
  log "env: $(grep '^device' "$OUT/env.txt")"
}

build_extension() {
  "$PY" - <<'EOF' >"$OUT/build.log" 2>&1
import os
os.environ["SPARSE_OFA_VERBOSE_BUILD"] = "1"
from sparse_ofa import backends
ok, why = backends.availability("cuda")
print("cuda backend:", ok, why, "meta_mode", getattr(backends._instance("cuda"), "meta_mode", None))
print("triton backend:", backends.availability("triton"))
EOF
  log "build: $(grep 'cuda backend' "$OUT/build.log")"
  # SASS of the built extension: the sparse tensor-core instruction must be there.
  local so
  so=$(find "$TORCH_EXTENSIONS_DIR" -name 'sparse_ofa_cuda*.so' 2>/dev/null | head -1)
  if [ -n "$so" ] && command -v cuobjdump >/dev/null; then
    cuobjdump --dump-sass "$so" >"$OUT/sp24_sass.txt" 2>&1
    log "sass: $(grep -c 'IMMA.SP' "$OUT/sp24_sass.txt") IMMA.SP, $(grep -c 'LDGSTS' "$OUT/sp24_sass.txt") LDGSTS"
  fi
}

stage_tests() {
  build_extension
  "$PY" -m pytest -q -rs tests/test_gpu_kernels.py tests/test_gpu_dispatch.py tests/test_gpu_cli.py tests/test_gpu_fastpath.py tests/test_triton_kernels.py \
    tests/test_gpu_triton_aot.py tests/test_cuda_compile.py --junitxml="$OUT/tests_junit.xml" \
    -p no:cacheprovider >"$OUT/tests.log" 2>&1
  local rc=$?
  log "tests: rc=$rc $(tail -1 "$OUT/tests.log")"
  [ $rc -ne 0 ] && STATUS=1
}

SANITIZE_PY='
import sys, torch
from sparse_ofa import backends
from sparse_ofa.formats import pack, unpack_int8
from sparse_ofa.masks import magnitude_mask
from sparse_ofa.quant import ActQuant
which = sys.argv[1]
torch.manual_seed(0)
ok = True
for m, n, k in [(1, 200, 128), (77, 384, 768), (300, 768, 3072)]:
    pattern = "2:4" if which == "cuda" else "unstructured"
    w = torch.randn(n, k)
    w = w * magnitude_mask(w, 0.5 if which == "cuda" else 0.9, pattern)
    packed = pack(w, pattern).to("cuda")
    be = backends.get_backend(which)
    prepared = be.prepare(packed)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    got = be.int_mm(x_q, prepared)
    ok &= torch.equal(got, (x_q.double() @ unpack_int8(packed).double().T).int())
    # the whole layer too: quantizer (in-kernel for the bitmap route), product, fused epilogue
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = backends.get_backend("reference")
    y = be.linear(x, prepared, packed.scale, None, ActQuant(), torch.float16)
    ok &= torch.equal(y, ref.linear(x, ref.prepare(packed), packed.scale, None, ActQuant(), torch.float16))
torch.cuda.synchronize()
print("exact", ok)
sys.exit(0 if ok else 1)
'

stage_sanitize() {
  build_extension
  if ! command -v compute-sanitizer >/dev/null; then
    log "sanitize: compute-sanitizer not found, skipped"; return
  fi
  # Build/autotune outside the sanitizer first, so it only sees the kernels.
  "$PY" -c "$SANITIZE_PY" cuda >/dev/null 2>&1
  "$PY" -c "$SANITIZE_PY" triton >/dev/null 2>&1
  for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -c "$SANITIZE_PY" cuda >"$OUT/sanitize_cuda_$tool.log" 2>&1
    local rc=$?
    log "sanitize cuda $tool: rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_cuda_$tool.log" | tail -1)"
    [ $rc -ne 0 ] && STATUS=1
  done
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "$SANITIZE_PY" triton \
    >"$OUT/sanitize_triton_memcheck.log" 2>&1
  local rc=$?
  log "sanitize triton memcheck: rc=$rc $(grep -E 'ERROR SUMMARY' "$OUT/sanitize_triton_memcheck.log" | tail -1)"
  [ $rc -ne 0 ] && STATUS=1
}

stage_bench() {
  build_extension
  SPARSE_OFA_BENCH_OUT="$OUT/bench" "$PY" -m pytest bench/test_layers_gpu.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_gpu.json" --benchmark-columns=median,iqr,rounds \
    >"$OUT/bench.log" 2>&1
  local rc=$?
  sed -n '/sparse_ofa speedup/,$p' "$OUT/bench.log" >"$OUT/bench_table.txt"
  log "bench: rc=$rc, table in bench_table.txt ($(wc -l <"$OUT/bench_table.txt") lines)"
  [ $rc -ne 0 ] && STATUS=1
}

install_package
for stage in "${STAGES[@]}"; do
  case "$stage" in
    env) stage_env ;;
    tests) stage_tests ;;
    sanitize) stage_sanitize ;;
    bench) stage_bench ;;
    bench-full) export SPARSE_OFA_BENCH_FULL=1; stage_bench ;;
    all) stage_env; stage_tests; stage_sanitize; stage_bench ;;
    *) echo "unknown stage $stage (env|tests|sanitize|bench|bench-full|all)"; exit 2 ;;
  esac
done
exit $STATUS
