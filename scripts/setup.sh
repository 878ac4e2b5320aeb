#!/usr/bin/env bash
# Set up Molmo Studio on a fresh Debian/Ubuntu machine: system packages, a virtual environment in .venv,
# pinned Python packages. `--test` adds what the test suite needs (Chromium, espeak-ng, test packages).
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

debs=(libportaudio2 ffmpeg)
(( want_tests )) && debs+=(espeak-ng sox chromium chromium-driver)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
req=requirements.txt
(( want_tests )) && req=requirements-test.txt
# torch is pinned exactly in requirements.txt: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check -r "$req"
if (( want_tests )); then
  # Test-only reference for the Molmo2 parity tests: transformers' own Molmo2 processors need torchvision, whose
  # PyPI wheel is a CUDA build that crashes next to CPU torch (and breaks `import peft`). So it never goes into
  # .venv: it lives in .ref/torchvision (ignored by git through .ref/.gitignore) and only the tests' reference
  # subprocess puts it on PYTHONPATH (tests/molmo2_reference.py). 0.28.0 is the build for torch 2.13.0.
  [[ -d .ref/torchvision/torchvision ]] || .venv/bin/pip install -q --disable-pip-version-check --no-deps \
    --target .ref/torchvision torchvision==0.28.0
  mkdir -p .ref && echo '*' > .ref/.gitignore
fi
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
