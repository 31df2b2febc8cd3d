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

# torch.compile (the experts and IPC 1000's evaluation: buffers.compile, evaluate.ipc.1000.compile)
# builds its kernels with a C++ compiler against Python's headers; without them the stages
# train eager (slower, other float rounding) and say so
NEED=""
command -v "${CXX:-c++}" >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || command -v clang++ >/dev/null 2>&1 || NEED="g++"
"$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || NEED="$NEED python3-dev"
if [ -n "$NEED" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $NEED >/dev/null; } \
      || echo "warning: could not install$NEED: torch.compile off (the stages train eager" \
      "and say so)" >&2
  else
    echo "warning: no$NEED: torch.compile off (the stages train eager and say so)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# requirements.lock pins every package with its hashes (pip-compile, Python 3.11 on Linux
# x86_64): the versions the README's numbers were measured with. On another Python the ranges
# of pyproject.toml apply instead, and numbers may move with the versions.
LOCKED_PY=3.11
if [ "$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$LOCKED_PY" ]; then
  .venv/bin/python -m pip install -q --require-hashes -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
else
  echo "warning: requirements.lock is for Python $LOCKED_PY; installing from pyproject.toml's ranges" >&2
  .venv/bin/python -m pip install -q -e ".[pipeline,dev]"
fi
[ -d .git ] || git init -q
[ -d .dvc ] || .venv/bin/dvc init -q

# vega, vega-lite and vega-embed in .plots/ (git-ignored): `datm plots` writes them into its
# HTML page, which then renders without a network (`dvc plots show` alone loads them from a CDN)
VEGA="vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0"
if [ ! -f .plots/node_modules/vega-embed/build/vega-embed.min.js ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --prefix .plots --no-audit --no-fund --loglevel=error $VEGA >/dev/null
  else
    echo "warning: no npm; for offline plots (datm plots) install Node.js and run" \
         "'npm install --prefix .plots $VEGA'" >&2
  fi
fi
echo "datm is set up: activate with 'source .venv/bin/activate'"
