#!/usr/bin/env bash
# One-call GPU validation of jem_ext, sized for a GPU machine that is lent for minutes and
# returns only one folder:
#
#   bash benchmarks/gpu_check.sh [--smoke] [OUT]          (default OUT: gpu_check_out)
#
# Steps, each with its own time limit inside a total budget (GPU_CHECK_TOTAL_S, default 345 s,
# build included; with a stopped step's 10 s grace, 6 minutes at most), each recorded in
# OUT/steps.tsv and OUT/summary.md as soon as it ends:
#   preflight  fails in seconds, with one line naming what is missing: the interpreter
#              (PYTHON, default python3), torch with CUDA and a CUDA device, nvcc (PATH or
#              /usr/local/cuda/bin), Python headers, the build and test requirements
#   build      a wheel for this GPU's architecture only (torch.cuda.get_device_capability),
#              against the installed torch: --no-build-isolation --no-deps --no-index, in a
#              temporary folder (nothing is downloaded, nothing is installed system-wide)
#   info       python -m jem_ext.info of that build
#   tests      pytest -m cuda (exactly the tests that need CUDA), -rA, per-test timeouts when
#              pytest-timeout is installed
#   memcheck   compute-sanitizer memcheck over benchmarks/sanitize_ops.py (every op and dtype,
#              forward and backward, odd shapes); racecheck over its reduction kernels
#   bench      python -m jem_ext.bench without torch.compile (bench.json / bench.md are
#              rewritten after every bench stage)
#   compile    the torch.compile option alone, last, with what is left of the budget
# Then OUT/summary.md (read it first: steps, times, headline figures beside their targets) and
# OUT/gpu_check.tar.gz (the whole folder).
#
# --smoke: the same script on a machine without a GPU (CI): the pre-flight without the CUDA
# requirements, the jem_ext already installed for PYTHON instead of a build, the CUDA test
# selection on one file, sanitize_ops.py on the CPU without the sanitizer, and the bench's
# --smoke sizes. Exit status: 0 when every step passed, 1 when one failed, 2 when the
# pre-flight failed or the arguments are wrong.
set -u

usage="usage: bash benchmarks/gpu_check.sh [--smoke] [OUT]"
SMOKE=0
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help)
      echo "$usage"
      exit 0
      ;;
    -*)
      echo "gpu_check: unknown option '$arg'; $usage" >&2
      exit 2
      ;;
    *)
      if [ -n "$OUT_ARG" ]; then
        echo "gpu_check: expected one output folder, got '$OUT_ARG' and '$arg'; $usage" >&2
        exit 2
      fi
      OUT_ARG="$arg"
      ;;
  esac
done
OUT_ARG="${OUT_ARG:-gpu_check_out}"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-345}"
case "$TOTAL_S" in
  '' | *[!0-9]*)
    echo "gpu_check: GPU_CHECK_TOTAL_S must be a whole number of seconds, got '$TOTAL_S'" >&2
    exit 2
    ;;
esac
if ! mkdir -p "$OUT_ARG" 2> /dev/null; then
  echo "gpu_check: cannot create the output folder '$OUT_ARG'" >&2
  exit 2
fi
OUT="$(cd "$OUT_ARG" && pwd)"
# The build tree, the built package and the test's working folder: not part of the results.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/jem_ext_gpu_check.XXXXXX")"
START=$SECONDS
FAILED=0
: > "$OUT/steps.tsv"
export PYTHONDONTWRITEBYTECODE=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 # never reach for the network

record() { # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
  echo "gpu_check: $1: $2 ($3 s)${4:+ $4}"
}

summarize() {
  "$PY" "$REPO/benchmarks/gpu_summary.py" "$OUT" > /dev/null 2>> "$OUT/summary_errors.log" || true
}

finish() {
  local rc=$?
  summarize
  # the archive is made beside the folder and moved in, so that it does not read itself
  [ -s "$OUT/summary_errors.log" ] || rm -f "$OUT/summary_errors.log"
  if tar -czf "$WORK/gpu_check.tar.gz" --exclude gpu_check.tar.gz \
    -C "$(dirname "$OUT")" "$(basename "$OUT")"; then
    mv "$WORK/gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
  fi
  rm -rf "$WORK"
  [ -f "$OUT/summary.md" ] && echo "gpu_check: read $OUT/summary.md first (archive: gpu_check.tar.gz)"
  exit "$rc"
}
trap finish EXIT

preflight_fail() { # one line naming what is missing, exit 2
  echo "gpu_check: pre-flight: $*" | tee -a "$OUT/preflight.log" >&2
  record preflight FAIL $((SECONDS - START)) "$*"
  exit 2
}

# step NAME LIMIT_S CMD...: run with the smaller of LIMIT_S and what is left of the budget,
# log to OUT/NAME.log, record the status, refresh summary.md. Returns the command's status.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((TOTAL_S - (SECONDS - START)))
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    record "$name" skipped 0 "time budget of ${TOTAL_S} s spent"
    summarize
    return 3
  fi
  local t0=$SECONDS rc status note=""
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124 | 137)
      status=TIMEOUT
      note="stopped after ${limit} s"
      ;;
    *)
      status="FAIL (exit $rc)"
      note="$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-160 | tr '\t|' '  ')"
      ;;
  esac
  [ "$rc" -ne 0 ] && FAILED=1
  record "$name" "$status" $((SECONDS - t0)) "$note"
  summarize
  return "$rc"
}

skip() { # skip NAME REASON
  record "$1" skipped 0 "$2"
  summarize
}

# ---------------------------------------------------------------------------- pre-flight
command -v "$PY" > /dev/null 2>&1 \
  || preflight_fail "interpreter '$PY' not found (set PYTHON to the Python that holds torch)"
if [ "$SMOKE" = 0 ]; then
  if ! command -v nvcc > /dev/null 2>&1; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
      export PATH="/usr/local/cuda/bin:$PATH"
    else
      preflight_fail "nvcc not found on PATH or in /usr/local/cuda/bin (the CUDA toolkit)"
    fi
  fi
  export CUDACXX="${CUDACXX:-$(command -v nvcc)}"
fi
missing="$(
  cd "$WORK" && GPU_CHECK_SMOKE="$SMOKE" "$PY" - 2>&1 << 'PYEOF'
import importlib.util
import os
import shutil
import sys
import sysconfig

smoke = os.environ["GPU_CHECK_SMOKE"] == "1"


def need(ok, what):
    if not ok:
        print(what)
        sys.exit(1)


need(sys.version_info >= (3, 10), f"Python >= 3.10 (got {sys.version.split()[0]})")
need(importlib.util.find_spec("torch") is not None, "torch is not importable")
try:
    import torch
except Exception as err:  # a broken install: one line, not a traceback
    need(False, f"torch fails to import: {type(err).__name__}: {err}".splitlines()[0])

if not smoke:
    need(torch.version.cuda is not None, f"a CUDA build of torch (got {torch.__version__})")
    need(torch.cuda.is_available() and torch.cuda.device_count() > 0, "a CUDA device")
    inc = sysconfig.get_paths()["include"]
    need(os.path.exists(os.path.join(inc, "Python.h")), f"the Python headers ({inc}/Python.h)")
    for mod in ("scikit_build_core", "pybind11"):
        need(importlib.util.find_spec(mod) is not None, f"the build requirement {mod}")
    for tool in ("cmake", "ninja"):
        need(
            shutil.which(tool) or importlib.util.find_spec(tool),
            f"the build requirement {tool} (a program or a Python module)",
        )
for mod in ("pytest", "hypothesis", "numpy", "scipy", "sklearn", "PIL", "matplotlib", "tqdm"):
    need(importlib.util.find_spec(mod) is not None, f"the test requirement {mod}")
if smoke:
    need(importlib.util.find_spec("jem_ext") is not None, "jem_ext installed for --smoke")
PYEOF
)" || preflight_fail "$(printf '%s\n' "${missing:-the pre-flight check could not run}" | tail -n 1)"
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  mode: $([ "$SMOKE" = 1 ] && echo smoke || echo full)"
  echo "python: $(command -v "$PY") $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  (cd "$WORK" && "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')")
  [ "$SMOKE" = 0 ] && nvcc --version | tail -n 1
  echo "compute-sanitizer: ${SANITIZER:-not found}"
} > "$OUT/env.txt" 2>&1
record preflight ok $((SECONDS - START)) ""

# -------------------------------------------------------------------------------- build
if [ "$SMOKE" = 1 ]; then
  skip build "smoke: the jem_ext installed for $PY"
else
  ARCH="$(cd "$WORK" && "$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')"
  export JEM_EXT_CUDA=ON JEM_EXT_CUDA_ARCHS="${ARCH}-real"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  export SKBUILD_BUILD_DIR="$WORK/build"
  if step build 200 bash -c "\"$PY\" -m pip wheel -v --no-build-isolation --no-deps --no-index \
      -w \"$WORK/wheel\" \"$REPO\" && \"$PY\" -m pip install --no-deps --no-index \
      --target \"$WORK/site\" \"$WORK\"/wheel/jem_ext-*.whl"; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: the build failed (see $OUT/build.log); nothing to test" >&2
    exit 1
  fi
fi

# everything below runs outside the source tree, so the built package is the one imported
cd "$WORK" || exit 1
step info 30 "$PY" -c "import jem_ext, jem_ext.info; print(jem_ext.__file__); jem_ext.info.main()"

# -------------------------------------------------------------------------------- tests
TIMEOUT_OPT=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then TIMEOUT_OPT=(--timeout=120); fi
if [ "$SMOKE" = 1 ]; then
  TESTS=("$REPO/tests/test_ops_energy.py")
else
  TESTS=("$REPO/tests")
fi
step tests 150 "$PY" -m pytest -m cuda -rA -q -p no:cacheprovider ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} "${TESTS[@]}"

# ---------------------------------------------------------------------------- sanitizer
if [ "$SMOKE" = 1 ]; then
  step sanitize_cpu 60 "$PY" "$REPO/benchmarks/sanitize_ops.py" --device cpu
elif [ -z "$SANITIZER" ]; then
  skip memcheck "compute-sanitizer not found"
else
  # no caching allocator: an access past a tensor is then past its allocation
  step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
    --error-exitcode 1 "$PY" "$REPO/benchmarks/sanitize_ops.py" --device cuda
  step racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" "$REPO/benchmarks/sanitize_ops.py" --device cuda --only energy
fi

# -------------------------------------------------------------------------------- bench
if [ "$SMOKE" = 1 ]; then
  step bench 60 "$PY" -m jem_ext.bench --smoke --stages env,ops --out "$OUT"
  skip compile "smoke: no torch.compile"
else
  # leave the compile stage about a minute; the bench skips the options it cannot start
  left=$((TOTAL_S - (SECONDS - START)))
  step bench 150 "$PY" -m jem_ext.bench --no-compile --budget-s $((left > 150 ? 110 : left * 2 / 3)) \
    --out "$OUT"
  step compile 120 "$PY" -m jem_ext.bench --stages chain --options "bf16 + cuda-graph + compile" \
    --out "$OUT/bench_compile"
fi

[ "$FAILED" = 0 ] || exit 1
exit 0
