#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs into .venv, lints, runs pytest.
# Needs only Python 3.11 and pip with access to the package registries (no GPU, no Docker, no model hub).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The Khronos glTF validator (npm) checks every GLB the tests make; Node 20 is on the machine.
npm install --silent --no-audit --no-fund --prefix .cache/node gltf-validator@2.0.0-dev.3.10
export GLTF_VALIDATOR_DIR="$PWD/.cache/node"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
