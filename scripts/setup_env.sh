#!/usr/bin/env bash
# Create (or update) the virtual environment .venv in the repository and install what the
# project needs. Usage: bash scripts/setup_env.sh [--dev]
#   --dev   also install the test and lint tools (requirements-dev.txt)
# PYTHON picks the interpreter (default python3); TORCH_VERSION the torch to install when the
# environment has none (default 2.13.0: CUDA build from PyPI on GPU machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
REQS=(requirements.txt)
if [ "${1:-}" = "--dev" ]; then REQS=(requirements.txt requirements-dev.txt); fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# Skip pip when the requirement files have not changed since the last successful install.
stamp=.venv/.installed-$(cat "${REQS[@]}" | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Install torch first and pinned: an open range with no torch present pulls the newest build.
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==${TORCH_VERSION}"
fi
for req in "${REQS[@]}"; do
    python -m pip install -q -r "$req"
done
touch "$stamp"
