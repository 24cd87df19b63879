#!/usr/bin/env bash
# Install distcl and what it needs, from nothing, into a project virtual environment (.venv/):
# Debian's Fashion-MNIST package (when apt is there), PyTorch + torchvision (torch-fidelity needs
# torchvision), and the project with its test and MLflow extras. Works with Debian/Ubuntu's own python3 (PEP 668:
# nothing is installed into the system Python; python3-venv is apt-installed where it is missing) and
# with any other Python >= 3.10 (PYTHON=/path/to/python3 ./install.sh). Puts a `distcl` link into a
# directory on PATH (~/.local/bin, else /usr/local/bin where writable). Idempotent: a second run
# installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }
apt_install() {
  command -v apt-get >/dev/null || return 1
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then command -v sudo >/dev/null || return 1; sudo="sudo"; fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"
}

command -v "$PY" >/dev/null || die "no $PY on PATH (set PYTHON=/path/to/python3, version >= 3.10)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); distcl needs >= 3.10"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist || say "could not apt-get install dataset-fashion-mnist; pass --data-dir or let distcl download it"
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian/Ubuntu ship venv's ensurepip separately (python3-venv, python3.X-venv).
    rm -rf "$VENV"
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python$ver-venv" || apt_install python3-venv \
      || die "$PY cannot create a virtual environment; install python3-venv (apt) and rerun"
    "$PY" -m venv "$VENV"
  fi
fi

PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch and torchvision as one matching pair (where pip is capped, the capped pair; else the newest);
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ picks a build for another CUDA version (into a new
# .venv: an installed torch is kept).
TORCH=("torch>=2.1" "torchvision>=0.16")
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH[@]}"
"${PIP[@]}" -e ".[test,mlflow]"

# On a machine with an NVIDIA driver, a torch that can use it, or one line naming the driver that torch needs
# (nothing is reinstalled behind the user's back: a CPU-only torch keeps working).
torch_cuda() { "$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "none")'; }
driver_for() {  # the oldest driver that runs CUDA $1 (NVIDIA's minor-version compatibility)
  case "${1%%.*}" in 11) echo 450.80.02 ;; 12) echo 525.60.13 ;; 13) echo 580.65.06 ;; *) echo "one for CUDA $1" ;; esac
}
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
  driver_cuda=$(nvidia-smi | grep -o 'CUDA Version: *[0-9.]*' | grep -o '[0-9.]*$' || echo unknown)
  built=$(torch_cuda)
  "$VENV/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
    || die "NVIDIA driver $driver (CUDA $driver_cuda) cannot run this torch (built for CUDA $built): install driver >= $(driver_for "$built") and rerun, or run: rm -rf $VENV && TORCH_INDEX_URL=https://download.pytorch.org/whl/cu${driver_cuda//./} ./install.sh (a torch for CUDA $driver_cuda, where PyTorch publishes one)"
  say "GPU: $(nvidia-smi -L | head -n 1); NVIDIA driver $driver; torch uses CUDA $built"
fi

# `distcl` on PATH, so the README's commands work in a fresh shell without activating the venv.
target="$(pwd)/$VENV/bin/distcl"
linked=""
for dir in "$HOME/.local/bin" /usr/local/bin; do
  case ":$PATH:" in *":$dir:"*) ;; *) continue ;; esac
  if [ -w "$dir" ] || { [ ! -e "$dir" ] && mkdir -p "$dir" 2>/dev/null; }; then
    ln -sfn "$target" "$dir/distcl" && linked="$dir/distcl" && break
  fi
done
if [ -n "$linked" ]; then
  say "distcl -> $linked (the environment is $(pwd)/$VENV; 'source $VENV/bin/activate' for ray and python)"
else
  say "no writable directory on PATH for a distcl link: run $target, or 'source $VENV/bin/activate'"
fi
