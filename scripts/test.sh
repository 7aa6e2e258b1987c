#!/usr/bin/env bash
# The test command of the README (CI runs exactly this):
#  1. the whole suite, Triton kernels through the interpreter on CPU (TRITON_INTERPRET=1);
#  2. the Triton kernels compiled for an H100 (sm_90) without running them, which the interpreter
#     cannot check (skipped automatically on a machine with a GPU, where the suite runs them for real).
# Extra arguments go to the first pytest run (e.g. -m "not distributed", -k fused).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate  # the environment scripts/demo.sh made
fi
TRITON_INTERPRET=${TRITON_INTERPRET:-1} python -m pytest tests -q "$@"
if [ $# -eq 0 ]; then
  TRITON_INTERPRET=0 python -m pytest tests -q -k compiles
fi
