#!/usr/bin/env bash
# One device command: build the CUDA extension from a clean tree, run the GPU-marked tests, then every
# GPU benchmark; results land in benchmarks/results/*.json and, via benchmarks/report.py, RESULTS.md.
# Usage on the GPU machine (torch + triton preinstalled, no network):
#   bash benchmarks/run_gpu.sh            # everything
#   QUICK=1 bash benchmarks/run_gpu.sh    # tests + kernel benchmarks only
# Wheels that are not preinstalled there (liger-kernel for the baseline) are taken from
# ${WHEELS:-.wheels}/ when present (git-ignored: name it in the device tool's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d "${WHEELS:-.wheels}" ]; then
  python -m pip install -q --no-index --find-links "${WHEELS:-.wheels}" liger-kernel || true
fi
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 || SDMPRUNE_CUDA=1 python setup.py build_ext --inplace
python - <<'PY'
import torch, triton, sdmprune._C as C
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda ext", C.compiled_with_cuda())
PY
# the whole suite without the interpreter: CUDA-parametrized cases run on the GPU, the rest as on CPU
python -m pytest tests -q -m "not distributed" 2>&1 | tail -25 || true
for b in bench_gather bench_fused_linear_distill_loss bench_taylor_importance; do
  python benchmarks/$b.py --out "$OUT" || echo "FAILED $b"
done
if [ "${QUICK:-0}" != "1" ]; then
  for b in bench_pipeline bench_offload bench_recovery; do
    python benchmarks/$b.py --out "$OUT" || echo "FAILED $b"
  done
fi
python benchmarks/report.py "$OUT" > benchmarks/RESULTS.md || true
python benchmarks/report.py --readme || true
