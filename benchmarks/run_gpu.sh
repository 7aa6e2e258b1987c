#!/usr/bin/env bash
# One device command: build the CUDA extension from a clean tree, run the suite on the GPU, then the
# GPU benchmarks; results land in $OUT (default benchmarks/results) as *.json, and benchmarks/report.py
# turns them into RESULTS.md and the README table.
# Usage on the GPU machine (torch + triton preinstalled, no network):
#   bash benchmarks/run_gpu.sh                          # everything
#   QUICK=1 bash benchmarks/run_gpu.sh                  # build, tests, kernel benchmarks only
#   BENCHES="bench_pipeline" SKIP_TESTS=1 bash benchmarks/run_gpu.sh   # a chosen subset
#   TESTS="tests/test_cli.py" ...                         # a chosen part of the suite
# Each step runs under its own time limit (STEP_TIMEOUT seconds, default 900) so that one hang
# cannot eat a whole lease; the log is tee'd to $OUT/gpu.log.
# Wheels that are not preinstalled there (liger-kernel for the baseline) are taken from
# ${WHEELS:-.wheels}/ when present (git-ignored: name it in the device tool's carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
exec > >(tee -a "$OUT/gpu.log") 2>&1
T=${STEP_TIMEOUT:-900}
step() { local t=$1; shift; echo "== $* (limit ${t}s) $(date +%T)"; timeout "$t" "$@"; local rc=$?;
         echo "== rc=$rc $(date +%T)"; return $rc; }

if [ -d "${WHEELS:-.wheels}" ]; then
  python -m pip install -q --no-index --no-deps "${WHEELS:-.wheels}"/*.whl || echo "wheels: install failed"
fi
if ! python -c "import sdmprune._C" 2>/dev/null; then
  SDMPRUNE_CUDA=1 step 600 python -m pip install -q --no-build-isolation --no-deps -e . \
    || { echo "pip -e failed; building in place"; SDMPRUNE_CUDA=1 step 600 python setup.py -q build_ext --inplace; }
fi
python - <<'PY' || exit 1
import torch, triton, sdmprune._C as C
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda ext", C.compiled_with_cuda())
PY
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  # the whole suite without the interpreter: CUDA-parametrized cases run on the GPU, the rest as on CPU
  xdist=$(python -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}")
  step "${TEST_TIMEOUT:-$T}" python -m pytest ${TESTS:-tests} -q -m "not distributed" -p no:cacheprovider $xdist -rfE \
    2>&1 | tail -40
fi
if [ -n "${BENCHES:-}" ]; then
  benches=$BENCHES
elif [ "${QUICK:-0}" = "1" ]; then
  benches="bench_gather bench_fused_linear_distill_loss bench_taylor_importance bench_layer_ops"
else
  benches="bench_gather bench_fused_linear_distill_loss bench_taylor_importance bench_layer_ops bench_pipeline bench_offload bench_recovery"
fi
[ "$benches" = none ] && benches=""
for b in $benches; do
  step "$T" python benchmarks/$b.py --out "$OUT" || echo "FAILED $b"
done
python benchmarks/report.py "$OUT" > benchmarks/RESULTS.md || true
python benchmarks/report.py --readme || true
