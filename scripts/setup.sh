#!/usr/bin/env bash
# Set up jem_ext for development on a fresh machine (idempotent): a virtual
# environment in .venv with the CPU build of torch, then jem_ext compiled
# into it with its test extras. Takes 2-4 minutes the first time.
#   PYTHON=python3.11 bash scripts/setup.sh   # choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# Pinned CPU build first: an unpinned `torch` would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# Editable: the source tree's jem_ext/ is then the package, with the compiled
# jem_ext._C found in the venv (so commands run from the checkout's root work).
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m jem_ext.info
