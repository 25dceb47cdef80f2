#!/usr/bin/env bash
# GPU check of the DCNv3 and DCNv4 CUDA kernels, for a machine with an NVIDIA GPU (H100/H200),
# torch with CUDA already installed, and no internet. From anywhere:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh     # the log goes to $OUT/gpu_check.log
#
# 1. rebuilds internimage._C for sm_90 against the local torch (editable install, no downloads),
# 2. runs tests/test_ops_cuda.py (both ops: golden files, CUDA against CPU on fresh random
#    inputs for every dtype over the shared case list tests/op_cases.py, which the CPU
#    emulation of the kernels runs too, group_channels 8/16/32/64 and batch 1/3/64 for DCNv4...),
# 3. runs the shared cases again under compute-sanitizer's memcheck and racecheck (one
#    cudaMalloc per tensor, so an out-of-bounds access is outside its allocation),
# 4. runs benchmarks/bench_gpu.py, which ends with two short tables: DCNv3 against its
#    reference, and DCNv4 beside DCNv3 (share of copy bandwidth, backward / forward).
# Without a GPU, `bash benchmarks/gpu_check.sh --dry-run` checks the CPU-side parts only: the
# test file collects (and skips), and bench_gpu.py runs its code paths on tiny CPU inputs.
# Each step has its own time limit; the whole run stays under 11 minutes.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

main() {
  local start=$SECONDS
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c 'import sys, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", gpu)'

  # torch needs the toolkit root. nvcc reports it (`#$ TOP=...` in --dryrun), which also works
  # when the nvcc on PATH is a wrapper script.
  if [[ -z "${CUDA_HOME:-}" ]]; then
    local nvcc top=""
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    if [[ ! -x $nvcc ]]; then
      echo "gpu_check: no nvcc found (put it on PATH or set CUDA_HOME); cannot build CUDA kernels"
      return 1
    fi
    local tmp
    tmp=$(mktemp -d)
    : >"$tmp/e.cu"
    top=$("$nvcc" --dryrun -c "$tmp/e.cu" -o "$tmp/e.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    rm -rf "$tmp"
    if [[ -n $top ]]; then
      CUDA_HOME=$(readlink -f "$top")
    else
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    fi
    export CUDA_HOME
  fi
  echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"

  echo "== build (sm_90)"
  local build_log="${OUT:-/tmp}/gpu_check_build.log"
  local t=$SECONDS
  if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 timeout 150 \
      python -m pip install --no-build-isolation --no-deps --no-index -v -e . \
      >"$build_log" 2>&1; then
    tail -n 60 "$build_log"
    echo "gpu_check: BUILD FAILED (full log: $build_log)"
    return 1
  fi
  local warnings count
  warnings=$(grep -iE '(warning|remark)[ :#]' "$build_log" | grep -viE 'setuptools|pip|license' \
    || true)
  count=$(grep -c . <<<"$warnings" || true)
  echo "built in $((SECONDS - t)) s; compiler warnings: $count"
  [[ $count == 0 ]] || head -n 20 <<<"$warnings"
  python -c 'import torch, internimage
ops = ("dcnv3", "_dcnv3_backward", "dcnv4", "_dcnv4_backward")
ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"internimage::{op}", "CUDA")
         for op in ops)
print("internimage", internimage.__version__, "| CUDA kernels registered:", ok)
raise SystemExit(0 if ok else "internimage._C was built without CUDA kernels")'

  echo "== tests/test_ops_cuda.py"
  local tests=0
  t=$SECONDS
  timeout 140 python -m pytest tests/test_ops_cuda.py -q -rs -p no:cacheprovider \
    --durations=5 || tests=$?
  echo "tests finished in $((SECONDS - t)) s (exit $tests)"

  echo "== compute-sanitizer (memcheck, racecheck) on the shared cases"
  local sanitizer sanitized=0
  sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [[ -x $sanitizer ]]; then
    local tool
    for tool in memcheck racecheck; do
      t=$SECONDS
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$sanitizer" --tool "$tool" \
        --error-exitcode 3 python -m pytest tests/test_ops_cuda.py -q -p no:cacheprovider \
        -k "matches_cpu and (gc16 or gc5 or gc1025 or gc3_rc or gc64)" || sanitized=$?
      echo "$tool finished in $((SECONDS - t)) s (exit $sanitized)"
    done
  else
    echo "gpu_check: compute-sanitizer not found; memcheck and racecheck skipped"
    sanitized=4
  fi

  echo "== benchmarks/bench_gpu.py"
  local bench=0
  timeout 160 python benchmarks/bench_gpu.py || bench=$?
  echo
  local verdict="tests $([[ $tests == 0 ]] && echo passed || echo "FAILED (exit $tests)")"
  verdict+=", sanitizer $([[ $sanitized == 0 ]] && echo clean || echo "FAILED (exit $sanitized)")"
  verdict+=", bench $([[ $bench == 0 ]] && echo ok || echo "FAILED (exit $bench)")"
  echo "gpu_check: $verdict, $((SECONDS - start)) s in all"
  [[ $tests == 0 && $sanitized == 0 && $bench == 0 ]]
}

dry_run() {
  echo "== gpu_check --dry-run (no GPU needed): collect the CUDA tests, run bench_gpu.py on CPU"
  python -m pytest tests/test_ops_cuda.py -q -rs -p no:cacheprovider
  python benchmarks/bench_gpu.py --dry-run
}

if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run
elif [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu_check.log"
else
  main
fi
