#!/usr/bin/env bash
# The main job from a fresh clone: install, export the default model, start Triton + the gateway,
# send a sample photo through every task, print where the outputs are and how long each step took.
# Without hub access pass a local checkpoint: scripts/quickstart.sh --checkpoint DIR (or CHECKPOINT=DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
echo "==> installing into .venv (a few minutes the first time: torch, onnxruntime, tritonserver)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[export,gateway,local]"
echo "==> installed"
exec .venv/bin/python scripts/quickstart.py "$@"
