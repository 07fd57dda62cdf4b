#!/usr/bin/env bash
# One-call GPU validation: build jem_ext against the machine's own torch, run the CUDA tests,
# then time the ops, the SGLD chain and training iterations (python -m jem_ext.bench).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu_check_out)
#
# Fits in 8 minutes on one H100 (each step has a time limit: 200 + 100 + 30 + 170 s).
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
# nothing can be installed (no network): report which build and test requirements are missing
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/requirements.txt"
import importlib.util
needed = {"build": ["scikit_build_core", "pybind11", "ninja", "cmake"],
          "tests": ["pytest", "hypothesis", "numpy", "sklearn", "scipy", "PIL", "matplotlib"]}
for use, names in needed.items():
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    print(f"{use} requirements missing: {', '.join(missing) or 'none'}")
PYEOF
step build 200 "$PY" -m pip install --no-build-isolation --no-deps -v .
# run from outside the source tree so the installed build (with its compiled part) is imported
# -k cuda: tests marked cuda and the device-parametrised tests' cuda cases
step pytest_cuda 100 bash -c "cd /tmp && $PY -m pytest -q -k cuda -p no:cacheprovider \
  --continue-on-collection-errors '$REPO/tests'"
step info 30 bash -c "cd /tmp && $PY -m jem_ext.info"
# bench.json / bench.md are rewritten after every stage, so a timeout keeps what was measured
step bench 170 bash -c "cd /tmp && $PY -m jem_ext.bench --budget-s 120 --out '$(realpath "$OUT")'"
cat "$OUT/summary.txt"
echo "gpu_check: results in $OUT (bench.json, bench.md, *.log, summary.txt)"
