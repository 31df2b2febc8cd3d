#!/usr/bin/env bash
# Set up datm on a fresh Debian/Ubuntu machine: Fashion-MNIST from apt, a virtualenv in .venv
# with datm and its tools. Safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: no apt-get; put Fashion-MNIST's idx files in datasets/FashionMNIST/raw/" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
[ -d .git ] || git init -q
[ -d .dvc ] || .venv/bin/dvc init -q
echo "datm is set up: activate with 'source .venv/bin/activate'"
