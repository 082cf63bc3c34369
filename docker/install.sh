#!/bin/sh
# Install nudging-proxy from this source tree into a new virtual environment.
#   docker/install.sh VENV [EXTRAS]      e.g. docker/install.sh /opt/venv demo
# The Dockerfile's build stage runs it, and CI runs it outside Docker in a fresh venv, so the
# image's install steps are exercised on every run. The install is not editable: the venv
# must work once the source tree is gone (the image copies only the venv).
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 VENV [EXTRAS]" >&2
    exit 2
fi
venv=$1
extras=${2:-}
source_dir=$(cd "$(dirname "$0")/.." && pwd)

# llama.cpp (the demo extra) builds for the machine it is built on by default; an image runs
# elsewhere, so build for a portable x86-64 AVX2 baseline (as the Makefile does).
: "${CMAKE_ARGS:=-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
export CMAKE_ARGS

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
if [ -n "$extras" ]; then
    "$venv/bin/python" -m pip install --quiet --no-cache-dir "$source_dir[$extras]"
else
    "$venv/bin/python" -m pip install --quiet --no-cache-dir "$source_dir"
fi

# The installed console script must start (it imports every server module).
"$venv/bin/nudging-proxy" --help > /dev/null
echo "installed nudging-proxy into $venv${extras:+ with extras: $extras}"
