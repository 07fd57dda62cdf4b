#!/usr/bin/env bash
# Set up jem_ext for development on a fresh machine (idempotent): a virtual
# environment in .venv with the CPU build of torch, then jem_ext compiled
# into it with its test and style extras. Takes 2-4 minutes the first time;
# when nothing that the build reads has changed since the last successful
# set-up it only checks that and returns in a second or two.
#   PYTHON=python3.11 bash scripts/setup.sh   # choose the interpreter
#   JEM_EXT_SETUP_FORCE=1 bash scripts/setup.sh   # rebuild regardless
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_pin="torch==2.13.0"
stamp=.venv/.jem_ext_setup_stamp

# Everything the build and the installed dependencies depend on.
build_inputs_hash() {
  {
    echo "$torch_pin"
    cat scripts/setup.sh pyproject.toml CMakeLists.txt
    find csrc python -type f | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -d' ' -f1
}

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
want=$(build_inputs_hash)
if [ -z "${JEM_EXT_SETUP_FORCE:-}" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c "import jem_ext._C" 2>/dev/null; then
  echo "jem_ext: set-up is current (.venv); JEM_EXT_SETUP_FORCE=1 rebuilds"
  exit 0
fi
rm -f "$stamp"
.venv/bin/python -m pip install --quiet --upgrade pip
# Pinned CPU build first: an unpinned `torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "$torch_pin"
# Editable: the source tree's jem_ext/ is then the package, with the compiled
# jem_ext._C found in the venv (so commands run from the checkout's root work).
.venv/bin/python -m pip install --quiet -e ".[test,dev]"
.venv/bin/python -m jem_ext.info
echo "$want" > "$stamp"
