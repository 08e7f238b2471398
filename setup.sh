#!/usr/bin/env bash
# Create .venv and install the project with its test extra. On a machine without an
# NVIDIA GPU, install the CPU build of torch first, from PyTorch's CPU-only index, so that
# pip does not fetch the multi-GB CUDA build that PyPI serves.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # PyTorch's CPU-only index (PyPI's default torch is the CUDA build). pip still looks in
    # any local wheels it is configured with (find-links); where the index cannot be
    # reached and no such wheel is there, fall back to the default index.
    .venv/bin/pip install --quiet --retries 1 --timeout 15 --index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0" 2>/dev/null ||
        .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e '.[test]'
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
