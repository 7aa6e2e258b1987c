#!/usr/bin/env bash
# The test command of the README: the whole suite, Triton kernels through the interpreter on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec python -m pytest tests -q "$@"
