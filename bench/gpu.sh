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
# The molmo2 section needs transformers >= 5.23 (native Molmo2); .whl2/ (git-ignored) may carry it and the
# hub client it needs: `pip download -d .whl2 --no-deps --python-version 3.12 --only-binary=:all: ...`.
if ! "$PY" -c "from transformers import Molmo2ForConditionalGeneration" 2>/dev/null && ls .whl2/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links .whl2 transformers==5.23.0 2>&1 | tail -n 3
  "$PY" -c "from transformers import Molmo2ForConditionalGeneration" 2>/dev/null ||
    "$PY" -m pip install -q --no-deps --no-index .whl2/*.whl 2>&1 | tail -n 3
fi
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
exec "$PY" -m bench.gpu --out "${OUT:-artifacts/gpu}" "$@"
