#!/usr/bin/env bash
# Set up .venv with the test tools and run lint + the test suite (what CI runs).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k prompts -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh --dev --llamacpp  # --llamacpp: the GGUF / llama.cpp tests (one-off compile)
# shellcheck disable=SC1091
source .venv/bin/activate
bash scripts/install_test_system_deps.sh

echo "== ruff"
ruff check .
echo "== shellcheck"
shellcheck scripts/*.sh scripts/lib/*.sh .ci/run
echo "== pytest"
# One test file per worker process (its fixtures built once), one torch thread per worker: on the
# 2 cores CI has, two single-threaded workers beat one worker with two threads. PYTEST_WORKERS=0
# runs everything in this process.
cores=$(nproc)
workers=${PYTEST_WORKERS:-$((cores < 4 ? cores : 4))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / (workers > 0 ? workers : 1)))}
python -m pytest -n "$workers" --dist loadfile --durations=20 "$@"
