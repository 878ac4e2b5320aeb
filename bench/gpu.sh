#!/usr/bin/env bash
# On the GPU machine: install the carried bitsandbytes wheel (.whl/, git-ignored), then run bench/gpu.py
# into $OUT (or artifacts/gpu). Carry `.whl` and `bench/official` with the working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-index .whl/bitsandbytes-*.whl 2>&1 | tail -n 2
else
  echo "no bitsandbytes wheel in .whl/: the 8-bit and 4-bit sections will report it"
fi
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
exec "$PY" -m bench.gpu --out "${OUT:-artifacts/gpu}" "$@"
