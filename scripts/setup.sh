#!/usr/bin/env bash
# Create .venv/ in the repo root and install mcp-sdxl with everything its tests and demo use.
# Safe to re-run. On a machine with an NVIDIA GPU the default (CUDA) torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1; then
  pip install -q "torch>=2.4"
  extras="test,pose,arcface,gpu"
else
  # CPU machine: 2.13.0 is the CPU build on these machines (plain `torch` would pull a 5 GB CUDA build).
  .venv/bin/python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
  extras="test,pose,arcface"
fi
pip install -q -e ".[${extras}]"
# Installed without their declared dependencies (see the pose/arcface extras in pyproject.toml).
pip install -q --no-deps "mediapipe==0.10.21" "insightface>=2.1"
# Exactly one OpenCV: if anything pulled opencv-python in, put headless back.
if pip show -q opencv-python >/dev/null 2>&1; then
  pip uninstall -y -q opencv-python
  pip install -q --force-reinstall --no-deps opencv-python-headless
fi
.venv/bin/python -c "import cv2, mediapipe, insightface, mcp_sdxl; print('setup ok: opencv', cv2.__version__)"
