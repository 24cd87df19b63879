#!/usr/bin/env bash
# Install distcl and what it needs, from nothing: Debian's Fashion-MNIST package (when apt is there),
# PyTorch + torchvision (torch-fidelity needs torchvision), and the project with its test extras.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# torch and torchvision as one matching pair (where pip is capped, the capped pair; else the newest)
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "torch>=2.1" "torchvision>=0.16"
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
