#!/usr/bin/env bash
# The GPU session in tiers, one device command each. The device tool lends one H200 for 15 minutes
# of device time in all (the machine's 1-2 minute start included) and at most 10 minutes a command,
# so each tier runs under an internal deadline and the two first tiers fit one session:
#   TIER=1 bash benchmarks/run_gpu.sh   # 8 min: build, the tests that need CUDA, the kernel
#                                       #   benchmarks' headline rows, the 1B target rows of bench_pipeline
#   TIER=2 bash benchmarks/run_gpu.sh   # 5 min: the 8B rows of bench_pipeline, bench_offload (resident
#                                       #   and offload cpu), bench_gather, bench_recovery
#   TIER=3 / TIER=4 / TIER=5            # later sessions: the rest of the suite and of the benchmark rows
#                                       #   (tier 4: hfprune beside sdmprune at 1B and 8B; tier 5: the
#                                       #   refit stage at 1B and 8B)
#   PLAN=1 bash benchmarks/run_gpu.sh   # (or --plan) every tier's steps and time caps; runs nothing
# benchmarks/GPU.md lists the commands in order, their time limits and which tier writes which file.
#
# Every step runs under `timeout`, capped by its own limit and by the time left before the tier's
# deadline (a step with too little time left is skipped, with a line saying so). Results land in
# $OUT (default out/gpu-tier<N>) as each step ends: the benchmarks' JSON, gpu-tier<N>.log (this
# script's whole output), pytest-<tests>.log (streamed while the tests run) with a JUnit XML, and
# steps.jsonl (one line per step: cap, seconds, exit status). A command cut short still returns them.
# Wheels that are not preinstalled there (liger-kernel for the loss baseline) are installed from
# ${WHEELS:-.wheels}/ when present (git-ignored: name it in the device tool's carry).
set -uo pipefail
cd "$(dirname "$0")/.."

# ------------------------------------------------------------------------------------------ tiers
# Per tier: its deadline (seconds from the tier's start), then one step a line:
#   name  cap_s  kind  path  what
# kind "always" counts toward the deadline; "cold" runs only when this machine has no CUDA build of
# the extension (a fresh machine: tier 1 built it on a warm one), so it is not counted: on a cold
# machine its time comes out of the steps after it. path: the script or test path the step runs.
TIER_DEADLINE_1=480
TIER_DEADLINE_2=300
TIER_DEADLINE_3=540
TIER_DEADLINE_4=480
TIER_DEADLINE_5=300
# bench_pipeline run specs (DEFAULT_RUNS in benchmarks/bench_pipeline.py) by tier: together, all of them
RUNS_1B_TARGET="1b:reference,1b:fused:mem=ref/3:chunk=128,1b:fused:b=12:chunk=128:n=48"
RUNS_8B="8b:reference,8b:fused:mem=18GiB,8b:fused:mem=18GiB:act=1:n=26,8b:fused:b=4:ckpt=0"
# the other 1B rows; the reference again, which mem=ref/3 needs in the same invocation (--merge keeps
# the first measurement of a spec)
# hfprune at 1B and 8B, each against its own official loop in the same invocation
RUNS_HFPRUNE="1b:reference:m=hfprune,1b:fused:m=hfprune:mem=ref/3:chunk=128,8b:reference:m=hfprune,8b:fused:m=hfprune:mem=18GiB"
# the refit stage after selection at 1B and 8B (its time beside the same run's scoring, its peak beside
# the memory model's)
RUNS_REFIT="1b:fused:b=4:refit=ls,8b:fused:b=2:refit=ls"
RUNS_1B_REST="1b:reference,1b:fused:b=4,1b:fused:b=16:chunk=128:n=32,1b:fused:b=16:chunk=128:act=1:n=32,1b:fused:mem=ref/3:chunk=128:act=1:n=32,1b:fused:b=8:ckpt=0"
LOSS_HEADLINE="--shapes 8192x4096x128256 --impls sdmprune_triton,liger_chunked_jsd"
TAYLOR_HEADLINE="--shapes 4096x14336 --tokens 4096"

tier_steps() {
  case $1 in
    1) cat <<'EOF'
build        110  always  setup.py                                      build the CUDA extension (pip -e), print the device
tests_cuda   105  always  tests                                         every test that needs CUDA (xdist), failures printed as they happen
loss         50   always  benchmarks/bench_fused_linear_distill_loss.py headline rows: 8192x4096x128256, sdmprune_triton and liger_chunked_jsd
taylor       55   always  benchmarks/bench_taylor_importance.py         headline row: 4096x14336, T 4096
layer_ops    40   always  benchmarks/bench_layer_ops.py                 all rows (rms_norm, rotary, gated activation)
pipeline_1b  115  always  benchmarks/bench_pipeline.py                  1B target rows -> pipeline-1b.json
EOF
    ;;
    2) cat <<'EOF'
build        110  cold    setup.py                                      only on a cold machine: build the CUDA extension
pipeline_8b  125  always  benchmarks/bench_pipeline.py                  8B rows -> pipeline-8b.json
offload      65   always  benchmarks/bench_offload.py                   resident and offload cpu (--no-distributed)
recovery     60   always  benchmarks/bench_recovery.py                  one-copy fused vs usual vs offloaded inputs
gather       40   always  benchmarks/bench_gather.py                    in-place gather vs index_select vs copy
EOF
    ;;
    3) cat <<'EOF'
build        110  cold    setup.py                                      only on a cold machine: build the CUDA extension
tests_rest   170  always  tests                                         the rest of the suite (xdist)
pipeline_1b_rest 175 always benchmarks/bench_pipeline.py                the other 1B rows -> pipeline-1b-rest.json
loss_all     130  always  benchmarks/bench_fused_linear_distill_loss.py every shape and implementation
taylor_all   60   always  benchmarks/bench_taylor_importance.py         every shape and T
EOF
    ;;
    4) cat <<'EOF'
build        110  cold    setup.py                                      only on a cold machine: build the CUDA extension
offload_all  200  always  benchmarks/bench_offload.py                   all four runs (data parallel and FSDP too)
pipeline_hfprune 230 always benchmarks/bench_pipeline.py                hfprune 1B and 8B rows -> pipeline-hfprune.json
EOF
    ;;
    5) cat <<'EOF'
build        110  cold    setup.py                                      only on a cold machine: build the CUDA extension
pipeline_refit 240 always benchmarks/bench_pipeline.py                  the refit stage at 1B and 8B -> pipeline-refit.json
EOF
    ;;
    *) return 1 ;;
  esac
}
TIERS="1 2 3 4 5"

deadline_of() { local v="TIER_DEADLINE_$1"; echo "${!v}"; }

print_plan() {
  local t line name cap kind path what sum lines
  echo "plan: each step runs under timeout -k ${KILL_GRACE} (kill grace ${KILL_GRACE}s) with its cap or the time left" \
       "before the tier's deadline, whichever is less; skipped when that would cut it to under ${MIN_STEP}s"
  for t in $TIERS; do
    sum=0
    echo "tier $t: deadline $(deadline_of "$t")s"
    mapfile -t lines < <(tier_steps "$t")
    for line in "${lines[@]}"; do
      read -r name cap kind path what <<< "$line"
      [ -z "$name" ] && continue
      printf '  step %-16s cap %4ss  %-6s  %-46s %s\n' "$name" "$cap" "$kind" "$path" "$what"
      [ "$kind" = always ] && sum=$((sum + cap))
    done
    echo "  sum of caps ${sum}s (steps that always run) of $(deadline_of "$t")s"
  done
  echo "bench_pipeline runs: pipeline_1b $RUNS_1B_TARGET"
  echo "bench_pipeline runs: pipeline_8b $RUNS_8B"
  echo "bench_pipeline runs: pipeline_1b_rest $RUNS_1B_REST"
  echo "bench_pipeline runs: pipeline_hfprune $RUNS_HFPRUNE"
  echo "bench_pipeline runs: pipeline_refit $RUNS_REFIT"
}

# ------------------------------------------------------------------------------------------ steps
# pytest plugin that splits the suite into the tests that need CUDA and the rest (SDM_SELECT=cuda|rest):
# a test needs CUDA when it carries the gpu mark, a skipif whose reason says it needs CUDA or a GPU,
# or a "cuda" parameter. Written to a temporary directory and loaded with -p (xdist workers load it too).
write_select_plugin() {
  cat > "$1/sdm_gpu_select.py" <<'PY'
import os
import re

_NEEDS = re.compile(r"\bneeds?\b.*\b(cuda|gpu)\b", re.IGNORECASE)


def needs_cuda(item):
    if item.get_closest_marker("gpu") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = mark.kwargs.get("reason") or (mark.args[1] if len(mark.args) > 1 else "")
        if _NEEDS.search(str(reason)):
            return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(
        str(v) == "cuda" or getattr(v, "type", None) == "cuda" for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    want = os.environ.get("SDM_SELECT")
    if want not in ("cuda", "rest"):
        return
    keep = [it for it in items if needs_cuda(it) == (want == "cuda")]
    drop = [it for it in items if needs_cuda(it) != (want == "cuda")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
PY
}

run_tests() {  # $1: cuda|rest
  local plugdir xdist
  plugdir=$(mktemp -d)
  write_select_plugin "$plugdir"
  xdist=$(python -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}")
  # the whole output streams to $OUT/pytest-$1.log; failing test names reach this log as they happen
  SDM_SELECT=$1 PYTHONPATH="$plugdir${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 \
    python -m pytest tests -p sdm_gpu_select -m "not distributed" -p no:cacheprovider $xdist -v -rfE \
      --junitxml="$OUT/pytest-$1.xml" 2>&1 \
    | tee "$OUT/pytest-$1.log" \
    | grep --line-buffered -E '(FAILED|ERROR)|^=+ .* in [0-9.]+s'
  return "${PIPESTATUS[0]}"
}

step_build() {
  if python -c "import sdmprune._C as C, sys; sys.exit(0 if C.compiled_with_cuda() else 1)" 2>/dev/null; then
    echo "sdmprune._C is already built with CUDA on this machine"
  else
    if [ -d "${WHEELS:-.wheels}" ]; then
      python -m pip install -q --no-index --no-deps "${WHEELS:-.wheels}"/*.whl || echo "wheels: install failed"
    fi
    SDMPRUNE_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . \
      || { echo "pip -e failed; building in place"; SDMPRUNE_CUDA=1 python setup.py -q build_ext --inplace; } \
      || return 1
  fi
  python - <<'PY'
import torch, triton, sdmprune._C as C
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "cuda ext", C.compiled_with_cuda())
PY
}
step_tests_cuda() { run_tests cuda; }
step_tests_rest() { run_tests rest; }
# shellcheck disable=SC2086 - the row options are word lists
step_loss() { python benchmarks/bench_fused_linear_distill_loss.py --out "$OUT" $LOSS_HEADLINE; }
step_loss_all() { python benchmarks/bench_fused_linear_distill_loss.py --out "$OUT"; }
# shellcheck disable=SC2086
step_taylor() { python benchmarks/bench_taylor_importance.py --out "$OUT" $TAYLOR_HEADLINE; }
step_taylor_all() { python benchmarks/bench_taylor_importance.py --out "$OUT"; }
step_layer_ops() { python benchmarks/bench_layer_ops.py --out "$OUT"; }
step_pipeline_1b() { python benchmarks/bench_pipeline.py --runs "$RUNS_1B_TARGET" --out "$OUT/pipeline-1b.json"; }
step_pipeline_8b() { python benchmarks/bench_pipeline.py --runs "$RUNS_8B" --out "$OUT/pipeline-8b.json"; }
step_pipeline_1b_rest() { python benchmarks/bench_pipeline.py --runs "$RUNS_1B_REST" --out "$OUT/pipeline-1b-rest.json"; }
step_pipeline_hfprune() { python benchmarks/bench_pipeline.py --runs "$RUNS_HFPRUNE" --out "$OUT/pipeline-hfprune.json"; }
step_pipeline_refit() { python benchmarks/bench_pipeline.py --runs "$RUNS_REFIT" --out "$OUT/pipeline-refit.json"; }
step_offload() { python benchmarks/bench_offload.py --out "$OUT" --no-distributed; }
step_offload_all() { python benchmarks/bench_offload.py --out "$OUT"; }
step_recovery() { python benchmarks/bench_recovery.py --out "$OUT"; }
step_gather() { python benchmarks/bench_gather.py --out "$OUT/gather.json"; }

have_cuda_build() {
  python -c "import sdmprune._C as C, sys; sys.exit(0 if C.compiled_with_cuda() else 1)" 2>/dev/null
}

# ------------------------------------------------------------------------------------------ runner
KILL_GRACE=5   # seconds between timeout's TERM and KILL
MIN_STEP=20    # a step that would be cut to less than this by the deadline is skipped

record() {  # tier step cap seconds rc status
  printf '{"tier": %s, "step": "%s", "cap_s": %s, "seconds": %s, "rc": %s, "status": "%s"}\n' "$@" \
    >> "$OUT/steps.jsonl"
}

run_tier() {
  local tier=$1 deadline start line name cap kind path what left limit t0 rc status failed=0 lines
  deadline=$(deadline_of "$tier")
  start=$SECONDS
  echo "== tier $tier: deadline ${deadline}s $(date +%T)"
  mapfile -t lines < <(tier_steps "$tier")  # read first: the steps must not share the loop's stdin
  for line in "${lines[@]}"; do
    read -r name cap kind path what <<< "$line"
    [ -z "$name" ] && continue
    if [ "$kind" = cold ] && have_cuda_build; then
      echo "== $name: skipped (the extension is already built with CUDA on this machine)"
      record "$tier" "$name" "$cap" 0 0 "not needed"
      continue
    fi
    left=$((start + deadline - SECONDS - KILL_GRACE))
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "$cap" ] && [ "$limit" -lt "$MIN_STEP" ]; then  # cut to under MIN_STEP: not worth starting
      echo "== SKIPPED $name: ${left}s left before the tier's deadline (needs at least ${MIN_STEP}s)"
      record "$tier" "$name" "$cap" 0 0 "skipped: deadline"
      continue
    fi
    echo "== $name: $what (limit ${limit}s) $(date +%T)"
    t0=$SECONDS
    timeout -k "$KILL_GRACE" "$limit" bash -c "step_$name" < /dev/null
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timeout after ${limit}s" ;;
      *) status=failed ;;
    esac
    [ $rc -ne 0 ] && failed=1
    echo "== $name: $status (rc=$rc, $((SECONDS - t0))s) $(date +%T)"
    record "$tier" "$name" "$cap" $((SECONDS - t0)) "$rc" "$status"
    if [ "$name" = build ] && [ $rc -ne 0 ]; then
      echo "== the build failed: the remaining steps need it; stopping tier $tier"
      return 1
    fi
  done
  echo "== tier $tier done in $((SECONDS - start))s $(date +%T)$([ $failed = 1 ] && echo ': some steps failed')"
  return $failed
}

# ------------------------------------------------------------------------------------------ main
if [ "${1:-}" = "--plan" ] || [ "${PLAN:-0}" = 1 ]; then
  print_plan
  exit 0
fi
if [ "${1:-}" = "--select-plugin" ]; then  # tests: the selection plugin, written to the directory $2
  write_select_plugin "$2"
  exit 0
fi
case "${TIER:-}" in
  1|2|3|4|5) ;;
  *) echo "usage: TIER=1|2|3|4|5 bash benchmarks/run_gpu.sh, or PLAN=1 bash benchmarks/run_gpu.sh (see benchmarks/GPU.md)" >&2
     print_plan >&2
     exit 2 ;;
esac
# the device tool sets OUT; elsewhere a git-ignored folder, never benchmarks/results itself (a tier
# writes headline-only files there that GPU.md merges into the results by hand)
OUT=${OUT:-out/gpu-tier$TIER}
mkdir -p "$OUT"
export OUT RUNS_1B_TARGET RUNS_8B RUNS_1B_REST RUNS_HFPRUNE RUNS_REFIT LOSS_HEADLINE TAYLOR_HEADLINE
# no interpreter: the kernels run on the GPU; offline: the machine has no network (no hub timeouts)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export -f write_select_plugin run_tests step_build step_tests_cuda step_tests_rest step_loss step_loss_all \
  step_taylor step_taylor_all step_layer_ops step_pipeline_1b step_pipeline_8b step_pipeline_1b_rest \
  step_pipeline_hfprune step_pipeline_refit step_offload step_offload_all step_recovery step_gather
exec > >(tee -a "$OUT/gpu-tier$TIER.log") 2>&1
tee_pid=$!
run_tier "$TIER"
rc=$?
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # the log is complete before the command returns
exit $rc
