#!/usr/bin/env bash
# The test command of the README (CI runs exactly this):
#  1. the whole suite, Triton kernels through the interpreter on CPU (TRITON_INTERPRET=1);
#  2. the Triton kernels compiled for an H100 (sm_90) without running them, which the interpreter
#     cannot check (skipped automatically on a machine with a GPU, where the suite runs them for real).
# Extra arguments go to the first pytest run (e.g. -m "not distributed", -k fused).
set -euo pipefail
cd "$(dirname "$0")/.."
# the active venv or ./.venv (the demo's), with every extra the tests exercise; installs what is missing
# shellcheck disable=SC1091
source scripts/env.sh test,gguf,lora,eval,torch-pruning,plot
TRITON_INTERPRET=${TRITON_INTERPRET:-1} python -m pytest tests -q "$@"
if [ $# -eq 0 ]; then
  TRITON_INTERPRET=0 python -m pytest tests -q -k compiles
fi
