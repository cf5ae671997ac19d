"""Throughput of the built-in engine against its peers, same model, same machine, one run.

Measured, for prompts of --prompt-len tokens (512 by default, distinct per sequence):
  prefill tok/s   one prompt at a time (batch 1)
  decode tok/s    at batch 1, 8 and 32, --output-len tokens per sequence (ignore_eos)
for
  parrot          the built-in engine (parrot.engine.LLMEngine), through its async API
  transformers    its own generate() with a KV cache, in bfloat16 and in float32
  vllm            with --peers, when benchmarks/setup_vllm.sh has installed it: its
                  OpenAI completions API on loopback, batches as concurrent requests
and the machine's own limits in the same run (float32 and bfloat16 matmul GFLOP/s, memory
bandwidth from a large copy), with the engine's share of them (bytes of weights and KV
read per second at decode, FLOP/s of its matmuls).

    python benchmarks/engine_throughput.py              # full run (several minutes)
    python benchmarks/engine_throughput.py --quick      # smoke run (short prompts, small batches)
    python benchmarks/engine_throughput.py --peers      # also vLLM, if installed

Results go to --out (bench-out/ by default): engine_throughput.json and engine_throughput.md.
The last line printed is a one-line summary of the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import inspect
import json
import os
import platform
import pydoc
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# the caller's own settings, before --threads set ours: vLLM's server gets these, not ours
CALLER_THREADS = {name: os.environ.get(name) for name in THREAD_VARIABLES}


def _preset_threads(argv: list[str]) -> None:
    """--threads must hold in every thread (the engine steps in a worker thread, where
    torch.set_num_threads from the main thread does not reach): set it before torch loads."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else None
        if value:
            os.environ["OMP_NUM_THREADS"] = value
            os.environ["MKL_NUM_THREADS"] = value


_preset_threads(sys.argv[1:])

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from parrot.bench import systems
from parrot.engine.device import CPU_BF16_MODES, DEFAULT_CPU_KV_GB, cpu_has_bf16_dot
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.loader import DEFAULT_MODEL, cache_dir, resolve_model_dir
from parrot.engine.model import Linear
from parrot.engine.model_runner import KVCacheTensors
from parrot.engine.sampler import SamplingParams

console = Console()

VLLM_VENV = Path(os.environ.get("PARROT_VLLM_VENV", cache_dir() / "vllm-venv"))


# ---- results ---------------------------------------------------------------


@dataclass
class SystemResult:
    name: str
    prefill_tok_s: float | None = None
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # batch -> tok/s
    decode_steps: dict[int, int] = field(default_factory=dict)  # batch -> decode steps measured
    notes: list[str] = field(default_factory=list)


@dataclass
class MachineLimits:
    cpu: str
    cores: int
    torch_threads: int
    fp32_matmul_gflops: float
    bf16_linear_gflops: float
    bf16_mm_gflops: float
    copy_gb_s: float  # bytes read + written per second
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] | None = None


@dataclass
class EngineShare:
    batch: int
    step_ms: float
    weight_bytes: int  # read per decode step
    kv_bytes: int  # read per decode step (mean context)
    gb_s: float
    bandwidth_share: float
    gflops: float
    compute_share: float


# ---- prompts ---------------------------------------------------------------


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """count distinct prompts of exactly length tokens, cut from the standard library's docstrings."""
    text_parts = []
    for name in ("collections", "typing", "asyncio", "json", "argparse", "logging", "pathlib", "re", "unittest", "email",
                 "http.client", "xml.dom.minidom", "subprocess", "threading", "decimal", "datetime", "sqlite3", "csv"):
        with contextlib.suppress(Exception):
            module = __import__(name, fromlist=["_"])
            text_parts.append(pydoc.render_doc(module, renderer=pydoc.plaintext))
    ids = tokenizer.encode("\n".join(text_parts))
    stride = max(1, min(length, (len(ids) - length) // max(count, 1)))
    if len(ids) < length + stride * (count - 1):
        # not enough text: repeat it (prompts still differ by their offsets)
        ids = ids * (1 + (length + stride * count) // max(len(ids), 1))
    return [ids[i * stride : i * stride + length] for i in range(count)]


class PromptPool:
    """Hands out prompts no one has used before: the engine caches prompt prefixes, so a
    prompt that was already filled would skip its prefill."""

    def __init__(self, prompts: list[list[int]]):
        self.prompts, self.next = prompts, 0

    def take(self, count: int) -> list[list[int]]:
        if self.next + count > len(self.prompts):
            raise RuntimeError(f"the prompt pool of {len(self.prompts)} is used up")
        self.next += count
        return self.prompts[self.next - count : self.next]


# ---- the machine -----------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _best_rate(fn, work: float, min_seconds: float, max_reps: int = 50) -> float:
    """work per second of fn, best of repeated runs for at least min_seconds (one warm-up first)."""
    fn()
    best, spent, reps = 0.0, 0.0, 0
    while (spent < min_seconds or reps < 2) and reps < max_reps:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        spent += elapsed
        reps += 1
        best = max(best, work / elapsed)
        if elapsed > 10:  # one slow run is measurement enough
            break
    return best


def _matmul_rates(quick: bool) -> tuple[float, float, float]:
    """GFLOP/s of fp32 mm, bf16 linear and bf16 mm (its operands are freed on return)."""
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    fp32 = _best_rate(lambda: torch.mm(a, b), 2 * n**3 / 1e9, 0.5 if quick else 1.5)
    # bf16 as models run it: x [M, K] @ W[N, K]^T (F.linear), and the plain mm kernel, much slower without AMX
    nb = 512 if quick else 1024
    x, w = torch.randn(nb, nb, dtype=torch.bfloat16), torch.randn(nb, nb, dtype=torch.bfloat16)
    bf16_linear = _best_rate(lambda: torch.nn.functional.linear(x, w), 2 * nb**3 / 1e9, 0.5 if quick else 1.5)
    xm = torch.randn(256, 256, dtype=torch.bfloat16)
    bf16_mm = _best_rate(lambda: torch.mm(xm, xm), 2 * 256**3 / 1e9, 0.3, max_reps=5)
    return fp32, bf16_linear, bf16_mm


def measure_machine(quick: bool) -> MachineLimits:
    load_before = os.getloadavg()
    fp32, bf16_linear, bf16_mm = _matmul_rates(quick)
    size = (64 if quick else 256) * 2**20 // 4
    src, dst = torch.randn(size), torch.empty(size)
    copy_gb_s = _best_rate(lambda: dst.copy_(src), 2 * size * 4 / 1e9, 0.5 if quick else 1.5)
    return MachineLimits(_cpu_name(), os.cpu_count() or 1, torch.get_num_threads(), fp32, bf16_linear, bf16_mm, copy_gb_s, load_before)


# ---- the built-in engine ---------------------------------------------------


def engine_weight_bytes(engine: LLMEngine, rows: int) -> int:
    """Bytes of matmul weights one forward step reads for `rows` rows (the bf16 copies at small batches)."""
    total = 0
    linears = [engine.model.lm_head] + [getattr(layer, name) for layer in engine.model.layers for name in ("qkv", "o_proj", "gate_up", "down")]
    for linear in linears:
        assert isinstance(linear, Linear)
        weight = linear.weight_for(rows)
        total += weight.numel() * weight.element_size()
    return total


def engine_matmul_flops(engine: LLMEngine, rows: int, context: int) -> float:
    c = engine.model_config
    params = sum(
        getattr(layer, name).weight.numel() for layer in engine.model.layers for name in ("qkv", "o_proj", "gate_up", "down")
    ) + engine.model.lm_head.weight.numel()
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * context  # q.k and p.v per token
    return rows * (2 * params + attention)


async def _engine_prefill(engine: LLMEngine, prompts: list[list[int]]) -> list[float]:
    rates = []
    for i, prompt in enumerate(prompts):
        context_id = f"bench-prefill-{i}"
        start = time.perf_counter()
        await engine.fill(context_id, None, prompt)
        rates.append(len(prompt) / (time.perf_counter() - start))
        engine.free_context(context_id)
    return rates


async def _engine_decode(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    ids = [f"bench-decode-{i}" for i in range(len(prompts))]
    await asyncio.gather(*(engine.fill(cid, None, p) for cid, p in zip(ids, prompts)))
    sampling = SamplingParams(max_tokens=output_len, ignore_eos=True)

    async def one(context_id: str) -> int:
        return len([t async for t in engine.generate(context_id, sampling)])

    steps_before = engine.stats().steps
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(cid) for cid in ids))
    elapsed = time.perf_counter() - start
    steps = engine.stats().steps - steps_before
    for cid in ids:
        engine.free_context(cid)
    return sum(counts) / elapsed, steps


# the engine at vLLM's precision on the CPU (--vllm-precision): KV cache and prompt attention in bf16
VLLM_PRECISION = {"kv_dtype": "bfloat16", "prompt_attention_dtype": "bfloat16"}


def run_engine(args, pool: PromptPool, batches, progress, cpu_bf16: str = "auto", name: str = "parrot",
               precision: dict[str, str] | None = None) -> tuple[SystemResult, LLMEngine]:
    task = progress.add_task(f"{name}: load", total=2 + len(batches))
    need_tokens = max(batches) * (args.prompt_len + args.output_len + 64)
    config = EngineConfig(model=args.model, cpu_bf16=cpu_bf16, **(precision or {}))
    per_token = KVCacheTensors.bytes_per_block(resolve_model_config(args.model), 1, config.torch_dtype)
    kv_gb = max(config.kv_memory_gb or DEFAULT_CPU_KV_GB, 1.25 * need_tokens * per_token / 2**30)
    engine = LLMEngine(EngineConfig(model=args.model, kv_memory_gb=kv_gb, cpu_bf16=cpu_bf16, **(precision or {})))
    result = SystemResult(name)
    progress.update(task, advance=1, description=f"{name}: warm-up")
    asyncio.run(_engine_decode(engine, pool.take(2), 4))
    progress.update(task, advance=1, description=f"{name}: prefill")
    rates = asyncio.run(_engine_prefill(engine, pool.take(args.prefill_reps)))
    result.prefill_tok_s = statistics.median(rates)
    for batch in batches:
        progress.update(task, description=f"{name}: decode batch {batch}")
        rate, steps = asyncio.run(_engine_decode(engine, pool.take(batch), args.output_len))
        result.decode_tok_s[batch], result.decode_steps[batch] = rate, steps
        progress.advance(task)
    engine.check_integrity()
    return result, engine


def resolve_model_config(model: str):
    from parrot.engine.loader import load_config

    return load_config(resolve_model_dir(model))


# ---- transformers ----------------------------------------------------------


def _cache_layers(cache):
    """(layer objects with .keys/.values) of a transformers Cache, across versions."""
    if hasattr(cache, "layers"):
        return cache.layers
    raise RuntimeError(f"unsupported transformers cache {type(cache).__name__}")


def _cast_cache(cache, dtype: torch.dtype):
    cache = copy.deepcopy(cache)
    for layer in _cache_layers(cache):
        layer.keys = layer.keys.to(dtype)
        layer.values = layer.values.to(dtype)
    return cache


def run_transformers(args, model_dir: Path, prompts, batches, progress) -> list[SystemResult]:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class Stamp(LogitsProcessor):
        """Records the time of every generation step (called once per forward)."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    class TimeBudget(StoppingCriteria):
        """Stops a very slow generate after budget seconds of decode (the rate is still per step)."""

        def __init__(self, stamp: Stamp, budget: float):
            self.stamp, self.budget = stamp, budget

        def __call__(self, input_ids, scores, **kwargs):
            over = len(self.stamp.times) >= 4 and self.stamp.times[-1] - self.stamp.times[0] > self.budget
            return torch.full((input_ids.shape[0],), over, dtype=torch.bool)

    dtypes = [getattr(torch, name) for name in args.hf_dtypes]
    task = progress.add_task("transformers: load", total=len(dtypes) * (1 + len(batches)) + len(batches))
    models = {dt: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt, attn_implementation="sdpa").eval() for dt in set(dtypes) | {torch.float32}}
    cache_arg = "cache" if "cache" in inspect.signature(models[torch.float32].forward).parameters else "past_key_values"
    results = {dt: SystemResult(f"transformers-{str(dt).removeprefix('torch.')}") for dt in dtypes}
    with torch.inference_mode():
        for dt in dtypes:
            model = models[dt]
            progress.update(task, description=f"transformers {results[dt].name}: prefill")
            model(torch.tensor([prompts[0][:16]]), use_cache=True, logits_to_keep=1)  # warm-up
            rates = []
            for prompt in prompts[: args.prefill_reps]:
                start = time.perf_counter()
                model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
                rates.append(len(prompt) / (time.perf_counter() - start))
                if time.perf_counter() - start > args.hf_budget:
                    break
            results[dt].prefill_tok_s = statistics.median(rates)
            progress.advance(task)
        for batch in batches:
            # the prompt cache (all but the last token) comes from one float32 forward, shared by the
            # dtypes; each generate() then runs its own decode steps over its own copy of it
            progress.update(task, description=f"transformers: prompt cache for batch {batch}")
            ids = torch.tensor(prompts[:batch])
            out = models[torch.float32].model(input_ids=ids[:, :-1], use_cache=True)
            prompt_cache = getattr(out, "cache", None) or out.past_key_values
            progress.advance(task)
            for dt in dtypes:
                progress.update(task, description=f"transformers {results[dt].name}: decode batch {batch}")
                stamp = Stamp()
                models[dt].generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.output_len,
                    min_new_tokens=args.output_len,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([stamp]),
                    stopping_criteria=StoppingCriteriaList([TimeBudget(stamp, args.hf_budget)]),
                    pad_token_id=models[dt].config.eos_token_id if models[dt].config.eos_token_id is not None else 0,
                    **{cache_arg: _cast_cache(prompt_cache, dt)},
                )
                steps = len(stamp.times) - 1
                results[dt].decode_tok_s[batch] = batch * steps / (stamp.times[-1] - stamp.times[0])
                results[dt].decode_steps[batch] = steps
                if steps + 1 < args.output_len:
                    note = f"batch {batch}: stopped after {steps + 1} of {args.output_len} tokens (--hf-budget {args.hf_budget:g}s)"
                    results[dt].notes.append(note)
                progress.advance(task)
            del prompt_cache, out
    return [results[dt] for dt in dtypes]


# ---- vLLM ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(threads: int | None) -> dict[str, str]:
    """vLLM's environment: --vllm-threads, else the caller's thread settings. Never our
    --threads: vLLM binds its engine to the cores it picks (one of two here), and two OpenMP
    threads spinning on one core made its decode 0.4 tok/s at batch 1."""
    env = {name: value for name, value in os.environ.items() if name not in CALLER_THREADS}
    env.update({name: value for name, value in CALLER_THREADS.items() if value is not None})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return systems.vllm_env(env)


class VllmServer:
    def __init__(self, model_dir: Path, max_len: int, log_path: Path, threads: int | None, dtype: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = vllm_env(threads)
        cmd = [
            str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", "bench",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", dtype, "--max-model-len", str(max_len), "--no-enable-prefix-caching",
        ]  # fmt: skip
        self.log_path = log_path
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(2)
        raise RuntimeError(f"vLLM did not start in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def _vllm_stream(client, url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Times at which each generated token arrived."""
    body = {
        "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "return_token_ids": True,
    }  # fmt: skip
    times: list[float] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            now = time.perf_counter()
            for choice in json.loads(line[5:]).get("choices", []):
                tokens = choice.get("token_ids")
                times.extend([now] * (len(tokens) if tokens is not None else 1 if choice.get("text") else 0))
    return times


def _windowed_rate(streams: list[list[float]]) -> tuple[float, int]:
    """Decode tok/s while every request is decoding: from the last first token to the first last token."""
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    inside = sum(1 for s in streams for t in s if start < t <= end)
    steps = min(sum(1 for t in s if start < t <= end) for s in streams)
    if end - start <= 0 or steps < 3:  # requests barely overlapped: whole span instead
        first, last = min(s[0] for s in streams), max(s[-1] for s in streams)
        return sum(len(s) - 1 for s in streams) / (last - first), min(len(s) for s in streams)
    return inside / (end - start), steps


async def _vllm_measure(url: str, pool: PromptPool, batches, output_len: int, prefill_reps: int, progress, task) -> SystemResult:
    import httpx

    result = SystemResult("vllm")  # renamed with its dtype by run_vllm
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        await _vllm_stream(client, url, pool.take(1)[0], 4)  # warm-up
        rates = []
        for prompt in pool.take(prefill_reps):
            start = time.perf_counter()
            times = await _vllm_stream(client, url, prompt, 1)
            rates.append(len(prompt) / (times[0] - start))
        result.prefill_tok_s = statistics.median(rates)
        result.notes.append("prefill: time to first token through the HTTP API")
        progress.advance(task)
        for batch in batches:
            progress.update(task, description=f"vLLM: decode batch {batch}")
            chosen = pool.take(batch)
            streams = await asyncio.gather(*(_vllm_stream(client, url, p, output_len) for p in chosen))
            result.decode_tok_s[batch], result.decode_steps[batch] = _windowed_rate(streams)
            progress.advance(task)
    return result


def run_vllm(args, model_dir: Path, pool: PromptPool, batches, progress) -> SystemResult | None:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists() or not (VLLM_VENV / ".parrot-vllm-ok").exists():
        console.print(f"[yellow]vLLM: skipped, not installed in {VLLM_VENV} (install it with: bash benchmarks/setup_vllm.sh)")
        return None
    task = progress.add_task("vLLM: starting the server (the first start compiles, minutes)", total=2 + len(batches))
    log_path = args.out / "vllm-server.log"
    server = VllmServer(model_dir, args.prompt_len + args.output_len + 64, log_path, args.vllm_threads, args.vllm_dtype)
    try:
        server.wait_ready(args.vllm_start_timeout)
        progress.update(task, advance=1, description="vLLM: prefill")
        result = asyncio.run(_vllm_measure(server.url, pool, batches, args.output_len, args.prefill_reps, progress, task))
        result.notes.append(f"--dtype {args.vllm_dtype}, threads {args.vllm_threads or 'vLLM default'}")
        return result
    except Exception as exc:  # the comparison goes on without it, saying why
        console.print(f"[red]vLLM: failed: {exc}")
        return SystemResult("vllm", notes=[f"failed: {exc}"])
    finally:
        server.stop()


# ---- report ----------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def results_table(systems: list[SystemResult], batches: list[int], args) -> Table:
    table = Table(title=f"{args.model}: prompts of {args.prompt_len} tokens, {args.output_len} output tokens (ignore_eos)")
    table.add_column("system")
    table.add_column("prefill tok/s", justify="right")
    for batch in batches:
        table.add_column(f"decode tok/s\nbatch {batch}", justify="right")
    for s in systems:
        table.add_row(s.name, _fmt(s.prefill_tok_s), *[_fmt(s.decode_tok_s.get(b)) for b in batches])
    return table


def share_table(limits: MachineLimits, shares: list[EngineShare]) -> Table:
    table = Table(title=f"machine: {limits.cpu}, {limits.cores} cores, torch threads {limits.torch_threads}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("float32 matmul", f"{limits.fp32_matmul_gflops:.1f} GFLOP/s")
    table.add_row("bfloat16 linear (x W^T)", f"{limits.bf16_linear_gflops:.1f} GFLOP/s")
    table.add_row("bfloat16 mm (plain)", f"{limits.bf16_mm_gflops:.2f} GFLOP/s")
    table.add_row("memory copy (read + write)", f"{limits.copy_gb_s:.1f} GB/s")
    for s in shares:
        table.add_row(
            f"parrot decode batch {s.batch}",
            f"{s.step_ms:.1f} ms/step; reads {s.weight_bytes / 1e6:.0f} MB weights + {s.kv_bytes / 1e6:.0f} MB KV"
            f" = {s.gb_s:.1f} GB/s ({100 * s.bandwidth_share:.0f}% of copy); "
            f"{s.gflops:.1f} GFLOP/s ({100 * s.compute_share:.0f}% of fp32 matmul)",
        )
    return table


def markdown(systems: list[SystemResult], batches: list[int], limits: MachineLimits, shares: list[EngineShare], args, command: str) -> str:
    lines = [
        f"# Engine throughput: {args.model}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {limits.cpu}, {limits.cores} cores, torch {torch.__version__} with {limits.torch_threads} threads; "
        f"load average before {limits.load_before[0]:.2f}, after {limits.load_after[0] if limits.load_after else float('nan'):.2f}.",
        "",
        f"Prompts of {args.prompt_len} tokens (distinct per sequence), {args.output_len} output tokens per sequence (ignore_eos).",
        "",
        "| system | prefill tok/s | " + " | ".join(f"decode tok/s batch {b}" for b in batches) + " |",
        "|---|---:|" + "---:|" * len(batches),
    ]
    for s in systems:
        lines.append(f"| {s.name} | {_fmt(s.prefill_tok_s)} | " + " | ".join(_fmt(s.decode_tok_s.get(b)) for b in batches) + " |")
    notes = [f"- {s.name}: {note}" for s in systems for note in s.notes]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "| machine limit | value |",
        "|---|---:|",
        f"| float32 matmul | {limits.fp32_matmul_gflops:.1f} GFLOP/s |",
        f"| bfloat16 linear (x W^T) | {limits.bf16_linear_gflops:.1f} GFLOP/s |",
        f"| bfloat16 mm (plain) | {limits.bf16_mm_gflops:.2f} GFLOP/s |",
        f"| memory copy (read + write) | {limits.copy_gb_s:.1f} GB/s |",
        "",
        "| parrot decode | ms/step | MB read/step (weights + KV) | GB/s | share of copy bandwidth | GFLOP/s | share of fp32 matmul |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in shares:
        lines.append(
            f"| batch {s.batch} | {s.step_ms:.1f} | {s.weight_bytes / 1e6:.0f} + {s.kv_bytes / 1e6:.0f} | {s.gb_s:.1f} | "
            f"{100 * s.bandwidth_share:.0f}% | {s.gflops:.1f} | {100 * s.compute_share:.0f}% |"
        )
    lines += ["", summary_line(systems, batches)]
    return "\n".join(lines) + "\n"


def summary_line(systems: list[SystemResult], batches: list[int]) -> str:
    by_name = {s.name: s for s in systems}
    ours = by_name["parrot"]
    parts = []
    peers = [(s.name, s.name.removeprefix("parrot ")) for s in systems if s.name.startswith(("parrot cpu-bf16=", "parrot vllm-precision"))]
    peers += [("transformers-float32", "transformers fp32"), ("transformers-bfloat16", "bf16"), ("vllm", "vLLM")]
    for batch in batches:
        rate = ours.decode_tok_s.get(batch)
        if rate is None:
            continue
        ratios = []
        for name, label in peers:
            peer = by_name.get(name)
            if peer and peer.decode_tok_s.get(batch):
                ratios.append(f"{rate / peer.decode_tok_s[batch]:.2f}x {label}")
        parts.append(f"batch{batch} {rate:.1f} tok/s" + (f" ({', '.join(ratios)})" if ratios else ""))
    if ours.prefill_tok_s:
        ratios = [f"{ours.prefill_tok_s / by_name[name].prefill_tok_s:.2f}x {label}" for name, label in peers
                  if name in by_name and by_name[name].prefill_tok_s]
        parts.append(f"prefill {ours.prefill_tok_s:.0f} tok/s" + (f" ({', '.join(ratios)})" if ratios else ""))
    return "engine-throughput: " + ", ".join(parts)


# ---- main ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))  # fmt: skip
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name, .gguf file or HF directory (default %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt (default %(default)s)")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens per sequence (default %(default)s)")
    parser.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated (default %(default)s)")
    parser.add_argument("--prefill-reps", type=int, default=3, help="prompts timed for prefill; the median counts (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: prompts of 64 tokens, 8 output tokens, batches 1,4")
    parser.add_argument("--peers", action="store_true", help="also vLLM, when benchmarks/setup_vllm.sh has installed it")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers")
    parser.add_argument("--cpu-bf16", default="auto",
                        help="the engine's --cpu-bf16 modes, comma-separated: the first is 'parrot', each other one more "
                             "engine run in the same process, named by its mode (e.g. auto,small-batches,off; default %(default)s)")
    parser.add_argument("--vllm-precision", action="store_true",
                        help="one more engine run in the same process, 'parrot vllm-precision': KV cache and prompt attention "
                             "in bf16 (--kv-dtype and --prompt-attention-dtype bfloat16), as vLLM computes on the CPU")
    parser.add_argument("--hf-dtypes", default="bfloat16,float32", help="transformers dtypes (default %(default)s)")
    parser.add_argument("--hf-budget", type=float, default=60.0, help="seconds of decode per transformers generate at most (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for this process (default: torch's)")
    parser.add_argument("--vllm-threads", type=int, default=None, help="OMP_NUM_THREADS for vLLM (default: vLLM's own choice)")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="vLLM --dtype (default %(default)s, as vLLM serves this model)")
    parser.add_argument("--vllm-start-timeout", type=float, default=900.0, help="seconds to wait for vLLM to start (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_len, args.output_len, args.batches, args.prefill_reps, args.hf_budget = 64, 8, "1,4", 1, 10.0
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.hf_dtypes = [d for d in args.hf_dtypes.split(",") if d]
    args.cpu_bf16 = [m for m in args.cpu_bf16.split(",") if m]
    if not args.cpu_bf16 or any(m not in CPU_BF16_MODES for m in args.cpu_bf16):
        parser.error(f"--cpu-bf16 takes modes among {', '.join(CPU_BF16_MODES)}")
    if min(args.batches) < 1 or args.prompt_len < 2 or args.output_len < 2:
        parser.error("batches must be positive, and prompts and outputs at least 2 tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    model_dir = resolve_model_dir(args.model)
    batches = args.batches
    from parrot.engine.tokenizer import Tokenizer

    per_system = 3 + args.prefill_reps + sum(batches)
    engines = len(args.cpu_bf16) + args.vllm_precision
    prompts = make_prompts(Tokenizer(model_dir), (engines + 1) * per_system, args.prompt_len)
    systems: list[SystemResult] = []
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("machine limits", total=1)
        limits = measure_machine(args.quick)
        progress.advance(task)
        engine_result, engine = run_engine(args, PromptPool(prompts[:per_system]), batches, progress, args.cpu_bf16[0])
        systems.append(engine_result)
        shares = []
        for batch in batches:
            rate = engine_result.decode_tok_s[batch]
            step = engine_result.decode_steps[batch]
            step_s = batch * args.output_len / rate / max(step, 1) if step else batch / rate
            context = args.prompt_len + args.output_len // 2
            weights = engine_weight_bytes(engine, batch)
            kv = batch * context * KVCacheTensors.bytes_per_block(engine.model_config, 1, engine.config.torch_dtype)
            flops = engine_matmul_flops(engine, batch, context)
            shares.append(
                EngineShare(batch, 1e3 * step_s, weights, kv, (weights + kv) / step_s / 1e9, (weights + kv) / step_s / 1e9 / limits.copy_gb_s,
                            flops / step_s / 1e9, flops / step_s / 1e9 / limits.fp32_matmul_gflops)  # fmt: skip
            )
        del engine
        for i, mode in enumerate(args.cpu_bf16[1:], start=1):  # the same engine, other matmul precisions
            other, engine = run_engine(args, PromptPool(prompts[i * per_system : (i + 1) * per_system]), batches, progress, mode,
                                       f"parrot cpu-bf16={mode}")
            systems.append(other)
            del engine
        if args.vllm_precision:  # the same engine and matmuls, the KV cache and prompt attention in bf16
            i = len(args.cpu_bf16)
            other, engine = run_engine(args, PromptPool(prompts[i * per_system : (i + 1) * per_system]), batches, progress,
                                       args.cpu_bf16[0], "parrot vllm-precision", VLLM_PRECISION)
            systems.append(other)
            del engine
        peers_prompts = prompts[engines * per_system :]
        if not args.no_transformers:
            systems += run_transformers(args, model_dir, peers_prompts, batches, progress)
        if args.peers:
            vllm = run_vllm(args, model_dir, PromptPool(peers_prompts), batches, progress)
            if vllm is not None:
                systems.append(vllm)
        limits.load_after = os.getloadavg()
    console.print(results_table(systems, batches, args))
    for s in systems:
        for note in s.notes:
            console.print(f"[dim]{s.name}: {note}")
    console.print(share_table(limits, shares))
    if limits.load_before[0] > 0.5 * limits.cores or (limits.load_after and limits.load_after[0] > 0.5 * limits.cores):
        console.print(f"[yellow]note: the machine was busy (load average {limits.load_before[0]:.1f} before, "
                      f"{limits.load_after[0]:.1f} after on {limits.cores} cores): numbers are noisy")  # fmt: skip
    payload = {
        "command": command,
        "model": args.model,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "batches": batches,
        "torch": torch.__version__,
        "cpu_bf16": {"modes": args.cpu_bf16, "cpu_has_bf16_dot": cpu_has_bf16_dot()},
        "vllm_precision": VLLM_PRECISION if args.vllm_precision else None,
        "machine": asdict(limits),
        "systems": [asdict(s) for s in systems],
        "engine_share": [asdict(s) for s in shares],
        "summary": summary_line(systems, batches),
    }
    (args.out / "engine_throughput.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "engine_throughput.md").write_text(markdown(systems, batches, limits, shares, args, command))
    console.print(f"[dim]wrote {args.out / 'engine_throughput.json'} and {args.out / 'engine_throughput.md'}")
    print(summary_line(systems, batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
