#!/usr/bin/env bash
# Install distcl and what it needs, from nothing, into a project virtual environment (.venv/):
# Debian's Fashion-MNIST package (when apt is there), PyTorch + torchvision (torch-fidelity needs
# torchvision), and the project with its test extras. Works with Debian/Ubuntu's own python3 (PEP 668:
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
# torch and torchvision as one matching pair (where pip is capped, the capped pair; else the newest)
"${PIP[@]}" "torch>=2.1" "torchvision>=0.16"
"${PIP[@]}" -e ".[test]"

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
