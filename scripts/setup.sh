#!/usr/bin/env bash
# Set up medslim on a fresh machine: a venv in .venv with torch 2.14.1 + torchvision 0.29.1
# (a matching pair; with torch 2.13 the PyPI torchvision fails to import and nnU-Net's trainer
# search crashes), then medslim with its test extras and the fast inference runtimes. Idempotent: a second run is quick.
# Quiet: only real errors are printed (pip's full log: VERBOSE=1 bash scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_PROGRESS_BAR=off
QUIET=(-q)
[ "${VERBOSE:-0}" = 1 ] && QUIET=()
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install "${QUIET[@]}" --upgrade pip
.venv/bin/python -m pip install "${QUIET[@]}" "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install "${QUIET[@]}" -e ".[test,fast,sweep]"
