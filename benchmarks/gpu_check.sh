#!/usr/bin/env bash
# One-call GPU validation: build jem_ext against the machine's own torch, run the CUDA tests,
# then time the ops, the SGLD chain and training iterations (python -m jem_ext.bench).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check_out)
#
# Needs: a CUDA GPU, torch with CUDA in the active Python, nvcc, no network (nothing is
# downloaded: the build uses the installed torch, --no-build-isolation --no-deps). Every step
# runs even when an earlier one fails; OUT_DIR gets build.log, pytest_cuda.log, bench.json,
# bench.md and summary.txt (the exit status of each step).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
REPO="$(pwd)"
export JEM_EXT_CUDA=ON                                  # a missing toolkit is an error here
export JEM_EXT_CUDA_ARCHS="${JEM_EXT_CUDA_ARCHS:-90-real}"  # sm_90 (H100/H200) only: faster build
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_S CMD...: run, log, record the exit status
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  return 0
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  | tee "$OUT/env.txt"
# the build requirements must already be installed (no network): report any that are missing
"$PY" -c "import scikit_build_core, pybind11, ninja" 2>&1 | tee "$OUT/build_requirements.txt"
step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v .
# run from outside the source tree so the installed build (with its compiled part) is imported
# -k cuda: tests marked cuda and the device-parametrised tests' cuda cases
step pytest_cuda 150 bash -c "cd /tmp && $PY -m pytest -q -k cuda -p no:cacheprovider \
  '$REPO/tests'"
step info 30 bash -c "cd /tmp && $PY -m jem_ext.info"
step bench 300 bash -c "cd /tmp && $PY -m jem_ext.bench --out '$(realpath "$OUT")'"
cat "$OUT/summary.txt"
echo "gpu_check: results in $OUT (bench.json, bench.md, *.log, summary.txt)"
