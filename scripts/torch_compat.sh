#!/usr/bin/env bash
# The compat subset on other torch versions, each in its own venv from the registry:
#   bash scripts/torch_compat.sh install 2.11.0     # .venv-torch-2.11.0 with the project's test extra
#   bash scripts/torch_compat.sh test 2.11.0        # pytest -m compat in it
# The subset (tests marked `compat`): tp / sp / cp / pp / FSDP equality with one device
# (FSDP with compile and activation checkpointing), train.py's 4-D equality and resume
# tests, and a 3-step train.py on every parallel dimension. PyPI's torch wheels are CUDA
# builds that also run on CPU: about a minute and 4-5 GB each.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1 version=$2
venv=.venv-torch-$version
case $what in
install)
    start=$(date +%s)
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    # pip's output goes to a log, shown only when it fails
    "$venv/bin/pip" install --quiet "torch==$version" -e '.[test]' >"$venv/install.log" 2>&1 ||
        { cat "$venv/install.log" >&2; echo "$venv: pip install failed" >&2; exit 1; }
    got=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    [ "$got" = "$version" ] || { echo "$venv: expected torch $version, found $got" >&2; exit 1; }
    echo "compat venv $venv: torch $got installed in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1) on disk"
    ;;
test)
    start=$(date +%s)
    echo "compat subset on torch $version"
    "$venv/bin/python" -m pytest -m compat
    echo "compat subset on torch $version: $(( $(date +%s) - start )) s"
    ;;
*)
    echo "usage: bash scripts/torch_compat.sh install|test VERSION" >&2; exit 2 ;;
esac
