#!/usr/bin/env bash
# Create (or update) the virtual environment .venv in the repository and install what the
# project needs. Usage: bash scripts/setup_env.sh [--dev] [--llamacpp]
#   --dev   also install the test and lint tools (requirements-dev.txt)
#   --llamacpp  also install gguf + llama-cpp-python (requirements-llamacpp.txt; compiles llama.cpp)
# PYTHON picks the interpreter (default python3); TORCH_VERSION the torch to install when the
# environment has none (default 2.13.0: CUDA build from PyPI on GPU machines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
REQS=(requirements.txt)
for arg in "$@"; do
    case "$arg" in
        --dev) REQS+=(requirements-dev.txt) ;;
        --llamacpp) REQS+=(requirements-llamacpp.txt) ;;  # GGUF / llama.cpp group (compiles llama.cpp)
        *) echo "setup_env.sh: unknown option $arg (use --dev, --llamacpp)" >&2; exit 2 ;;
    esac
done
# llama-cpp-python builds llama.cpp: a portable AVX2 build, without llama.cpp's examples and tools.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

# Skip pip when the requirement files have not changed since the last successful install.
stamp=.venv/.installed-$(cat "${REQS[@]}" pyproject.toml | sha256sum | cut -c1-16)
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
# The package itself, editable: tools/ and tests import chinese_vicuna from this checkout.
python -m pip install -q --no-deps -e .
touch "$stamp"
