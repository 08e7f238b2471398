#!/usr/bin/env bash
# Create .venv and install the project with its test extra. On a machine without an
# NVIDIA GPU, install the CPU build of torch first (small, and on some machines already
# on local disk) so that pip does not fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # where this pin is not a CPU build, install your own torch into .venv first
    .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e '.[test]'
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
