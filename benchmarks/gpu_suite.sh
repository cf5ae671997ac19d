#!/usr/bin/env bash
# Issue 10's GPU measurements in one script, for a CUDA machine (the `device` tool's H100):
# correctness first (the GPU tests), then the kernel, the engine and the app benchmarks with
# LLaMA-7B's shape. Prepare here with `bash benchmarks/gpu_prepare.sh`, then:
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".gpu"], timeout_s=600)
# STAGES picks parts (default "tests kernel engine apps"); results land in $OUT (or bench-out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
STAGES=${STAGES:-tests kernel engine apps}
APPS=${APPS:-chain-summary map-reduce gpts mixed}
mkdir -p "$OUT"
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PARROT_TEST_MODEL=${PARROT_TEST_MODEL:-$PWD/.gpu/model}
MODEL=${MODEL:-$PWD/.gpu/model}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
for stage in $STAGES; do
  case $stage in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_attention.py tests/test_device.py 2>&1 | tee "$OUT/gpu-tests.log" ;;
    kernel) python3 benchmarks/gpu_attention.py --out "$OUT" ;;
    engine) python3 benchmarks/gpu_engine.py --model "$MODEL" --out "$OUT" ;;
    apps) for workload in $APPS; do
            python3 -m parrot.cli bench "$workload" --device cuda --random-weights llama-7b --model "$MODEL" --out "$OUT" 2>&1 | tail -3
          done ;;
    *) echo "unknown stage $stage (tests, kernel, engine, apps)"; exit 2 ;;
  esac
done
