#!/usr/bin/env bash
# The test command: creates .venv if needed, installs fastDeploy with its test and Redis
# extras and the real-model recipes' dependencies, then runs pytest (arguments pass on).
# Tests that need Redis use the server on 127.0.0.1:6379 when it answers, or start their
# own redis-server on a free port.
set -euo pipefail
cd "$(dirname "$0")"
venv="${FASTDEPLOY_TEST_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install -e ".[test,redis]"
# Real-model recipes. torch first and pinned, so nothing resolves a multi-GB CUDA build.
pip install torch==2.13.0
pip install -r recipes/minilm/requirements.txt
pip install -r recipes/vad/requirements.txt
pip install --no-deps -r recipes/vad/requirements-nodeps.txt
pip install -r recipes/ocr/requirements.txt
export HF_HUB_OFFLINE=1
exec python -m pytest "$@"
