#!/usr/bin/env bash
# Set up medslim on a fresh machine: a venv in .venv with torch 2.14.1 + torchvision 0.29.1
# (a matching pair; with torch 2.13 the PyPI torchvision fails to import and nnU-Net's trainer
# search crashes), then medslim with its test extras and the fast inference runtimes. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test,fast]"
