#!/usr/bin/env bash
# Issue 10's GPU measurements in one script, for a CUDA machine (the `device` tool's H100):
# correctness first (the GPU tests), then the kernel, the engine and the app benchmarks with
# LLaMA-7B's shape. Prepare here with `bash benchmarks/gpu_prepare.sh`, then:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu"], timeout_s=600)
# STAGES picks parts (default "tests kernel engine apps"), APPS the app workloads; the chain and
# map-reduce workloads run with APP_FLAGS (default "--baseline-policy latency-centric": the paper's
# request-level setting beside our own; "" to drop it), multi-agent with MA_FLAGS (default none;
# "--baselines-without-prefix-caching" for the paper's baselines); each stage is cut at its own limit
# (TESTS_S, KERNEL_S, ENGINE_S, APP_S per app workload) so one hang cannot spend the lease.
# $OUT (or bench-out/gpu) receives device.txt, suite.log and results.tgz, re-packed after
# every stage: the device tool brings back at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
WORK=bench-out/gpu-work
STAGES=${STAGES:-tests kernel engine apps}
APPS=${APPS:-chain-summary map-reduce gpts mixed}
TESTS_S=${TESTS_S:-120} KERNEL_S=${KERNEL_S:-90} ENGINE_S=${ENGINE_S:-150} APP_S=${APP_S:-300}
mkdir -p "$OUT" "$WORK"
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PARROT_TEST_MODEL=${PARROT_TEST_MODEL:-$PWD/.gpu/model}
MODEL=${MODEL:-$PWD/.gpu/model}
exec > >(tee -a "$OUT/suite.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, say how it ended, pack the results
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - start))s"
  tar czf "$OUT/results.tgz" -C "$WORK" .
}
for stage_name in $STAGES; do
  case $stage_name in
    tests) stage tests "$TESTS_S" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_attention.py tests/test_device.py ;;
    kernel) stage kernel "$KERNEL_S" python3 benchmarks/gpu_attention.py --out "$WORK" ;;
    engine) stage engine "$ENGINE_S" python3 benchmarks/gpu_engine.py --model "$MODEL" --out "$WORK" ;;
    apps) for workload in $APPS; do
            case $workload in  # the paper's sizes where the workload has them (not soak)
              chain-summary|chain-summary-bg|multi-chain|map-reduce) flags="--paper-scale ${APP_FLAGS---baseline-policy latency-centric}" ;;
              mixed) flags="--paper-scale --step-trace" ;;  # where its chats' time goes, step by step
              multi-agent) flags="--paper-scale ${MA_FLAGS-}" ;;  # MA_FLAGS=--baselines-without-prefix-caching: the paper's vLLM
              gpts|shared-prompt) flags=--paper-scale ;;
              *) flags= ;;
            esac
            stage "$workload" "$APP_S" python3 -m parrot.cli bench "$workload" $flags \
              --device cuda --random-weights llama-7b --model "$MODEL" --out "$WORK"
            for steps in "$WORK"/"$workload"-*-steps; do  # the step traces, summed up into the log
              [ -d "$steps" ] && python3 -m parrot.engine.step_trace "$steps"
            done
          done ;;
    *) echo "unknown stage $stage_name (tests, kernel, engine, apps)"; exit 2 ;;
  esac
done
