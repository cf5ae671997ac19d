"""The built-in engine on a GPU at the paper's model size, against transformers and the roofline.

LLaMA-7B's shape with random weights (`--random-weights`: a step's time does not depend on the
values), bf16, on one GPU, in one run:
  prefill tok/s   one --prompt-len prompt at a time (median of 3)
  decode tok/s    at each --batches size, --output-len tokens per sequence (ignore_eos)
for
  parrot          the built-in engine (Triton attention, decode from CUDA graphs)
  transformers    LlamaForCausalLM of the same shape on the same GPU, sdpa attention, a KV
                  cache, one forward per decode step (what its generate() runs)
  roofline        a decode step can be no faster than reading the weights and the batch's KV
                  once at the device's read rate (a sum over 1 GiB, measured in the same run)
and, for the engine alone, decode of --batches children forked from one --shared-prefix-token
parent (8 own tokens each), with shared-prefix attention (the segment read once per step, from
the shared CUDA graphs) against without it (every child reads the prefix, plain graphs).

    python benchmarks/gpu_engine.py                          # on a CUDA GPU (RESULTS.md)
    python benchmarks/gpu_engine.py --quick --device cpu     # smoke run (tiny shape, float32)

Writes --out/gpu_engine.json and .md; the last line printed sums up the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import PromptPool, _engine_decode, _engine_prefill, make_prompts  # noqa: E402
from gpu_attention import read_gbps  # noqa: E402

from parrot.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from parrot.engine.loader import DEFAULT_MODEL, load_config, resolve_model_dir  # noqa: E402
from parrot.engine.model_runner import KVCacheTensors  # noqa: E402
from parrot.engine.random_weights import SHAPES, shape_config  # noqa: E402
from parrot.engine.sampler import SamplingParams  # noqa: E402
from parrot.engine.tokenizer import Tokenizer  # noqa: E402


@dataclass
class Rates:
    name: str
    prefill_tok_s: float = 0.0
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # batch -> tok/s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes_per_token(shape_name: str, dtype: torch.dtype) -> int:
    return KVCacheTensors.bytes_per_block(shape_config(shape_name, vocab_size=1), 1, dtype)


async def _forked_decode(engine: LLMEngine, prefix: list[int], suffixes: list[list[int]], output_len: int) -> float:
    """Decode tok/s of children forked from one parent context, all generating at once."""
    await engine.fill("bench-parent", None, prefix)
    ids = [f"bench-child-{i}" for i in range(len(suffixes))]
    await asyncio.gather(*(engine.fill(cid, "bench-parent", s) for cid, s in zip(ids, suffixes)))
    sampling = SamplingParams(max_tokens=output_len, ignore_eos=True)

    async def one(context_id: str) -> int:
        return len([t async for t in engine.generate(context_id, sampling)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(cid) for cid in ids))
    elapsed = time.perf_counter() - start
    for cid in [*ids, "bench-parent"]:
        engine.free_context(cid)
    return sum(counts) / elapsed


def release_memory(device: torch.device) -> None:
    # an engine and its step-loop task refer to each other, so only the cycle collector frees
    # its KV pool and weights; torch's allocator then hands the memory back
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_forked(args, pool: PromptPool, device: torch.device, dtype: torch.dtype, sharing: bool) -> dict[int, float]:
    """Batch -> decode tok/s of forks of one long parent, shared-prefix attention on or off."""
    batches = [b for b in args.batches if b > 1]
    tokens = args.shared_prefix + max(batches) * (8 + args.output_len + 32)
    engine = LLMEngine(EngineConfig(model=args.model, random_weights=args.config, device=device.type, dtype=str(dtype).removeprefix("torch."),
                                    kv_memory_gb=1.25 * tokens * kv_bytes_per_token(args.config, dtype) / 2**30,
                                    max_seqs_per_step=max(batches), cpu_bf16="off", shared_prefix_attention=sharing,
                                    prefix_caching=False))
    text = [t for prompt in pool.take(1 + args.shared_prefix // args.prompt_len) for t in prompt]
    rates = {}
    asyncio.run(_forked_decode(engine, text[: args.shared_prefix], [p[:8] for p in pool.take(2)], 4))  # warm-up
    for batch in batches:
        parent = [t for prompt in pool.take(1 + args.shared_prefix // args.prompt_len) for t in prompt][: args.shared_prefix]
        rates[batch] = asyncio.run(_forked_decode(engine, parent, [p[:8] for p in pool.take(batch)], args.output_len))
        print(f"forks of a {args.shared_prefix}-token prefix, sharing {'on' if sharing else 'off'}, batch {batch}: "
              f"{rates[batch]:.0f} tok/s", flush=True)
    engine.check_integrity()
    del engine
    return rates


def run_parrot(args, pool: PromptPool, device: torch.device, dtype: torch.dtype) -> Rates:
    tokens = max(args.batches) * (args.prompt_len + args.output_len + 32) + 4 * args.prompt_len
    kv_gb = 1.25 * tokens * kv_bytes_per_token(args.config, dtype) / 2**30
    engine = LLMEngine(EngineConfig(model=args.model, random_weights=args.config, device=device.type, dtype=str(dtype).removeprefix("torch."),
                                    kv_memory_gb=kv_gb, max_seqs_per_step=max(args.batches), cpu_bf16="off"))
    rates = Rates("parrot")
    asyncio.run(_engine_decode(engine, pool.take(2), 4))  # warm-up
    rates.prefill_tok_s = statistics.median(asyncio.run(_engine_prefill(engine, pool.take(3))))
    for batch in args.batches:
        rates.decode_tok_s[batch] = asyncio.run(_engine_decode(engine, pool.take(batch), args.output_len))[0]
        print(f"parrot batch {batch}: {rates.decode_tok_s[batch]:.0f} tok/s", flush=True)
    engine.check_integrity()
    del engine
    return rates


def run_transformers(args, pool: PromptPool, device: torch.device, dtype: torch.dtype, vocab: int) -> Rates:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = shape_config(args.config, vocab)  # the shape our engine runs, in transformers' names
    config = LlamaConfig(vocab_size=vocab, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         max_position_embeddings=c.max_position_embeddings, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    rates = Rates("transformers")
    # newer transformers name the KV cache argument `cache`, older ones `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(ids: list[list[int]]):
        return model(torch.tensor(ids, device=device), use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        prefill(pool.take(1))  # warm-up
        times = []
        for prompt in pool.take(3):
            _sync(device)
            start = time.perf_counter()
            prefill([prompt])
            _sync(device)
            times.append(len(prompt) / (time.perf_counter() - start))
        rates.prefill_tok_s = statistics.median(times)
        for batch in args.batches:
            out = prefill(pool.take(batch))
            cache, next_ids = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.output_len):
                out = model(next_ids, use_cache=True, **{cache_arg: cache})
                cache, next_ids = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            rates.decode_tok_s[batch] = batch * args.output_len / (time.perf_counter() - start)
            print(f"transformers batch {batch}: {rates.decode_tok_s[batch]:.0f} tok/s", flush=True)
            del cache, out
    return rates


def roofline(args, vocab: int, dtype: torch.dtype, read_rate_gbps: float) -> Rates:
    """Decode tok/s if a step only read the weights and the batch's KV once at the read rate."""
    c = shape_config(args.config, vocab)
    element = torch.tensor([], dtype=dtype).element_size()
    attention = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
    weights = element * (c.num_layers * (attention + 3 * c.hidden_size * c.intermediate_size) + 2 * vocab * c.hidden_size)
    kv_per_token = kv_bytes_per_token(args.config, dtype)
    context = args.prompt_len + args.output_len // 2
    rates = Rates("roofline")
    for batch in args.batches:
        step_s = (weights + batch * context * kv_per_token) / (read_rate_gbps * 1e9)
        rates.decode_tok_s[batch] = batch / step_s
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config", default="llama-7b", choices=sorted(SHAPES), help="model shape (default %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer (and vocabulary) to use")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--shared-prefix", type=int, default=4096, help="tokens of the parent the forked-decode case shares (0: skip it)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 32-token prompts, 8 tokens, batches 1,4")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.config, args.prompt_len, args.output_len, args.batches, args.shared_prefix = "tiny", 32, 8, [1, 4], min(args.shared_prefix, 64)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (use --quick --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer(model_dir)
    vocab = max(load_config(model_dir).vocab_size, tokenizer.vocab_size)
    forked_prompts = 2 * (2 + sum(args.batches) + len(args.batches) * (1 + args.shared_prefix // args.prompt_len)) if args.shared_prefix else 0
    pool = PromptPool(make_prompts(tokenizer, 16 + 2 * sum(args.batches) + forked_prompts, args.prompt_len))
    read_rate = read_gbps(device, 10)
    systems = [] if args.no_transformers else [run_transformers(args, pool, device, dtype, vocab)]
    release_memory(device)  # the transformers model is gone: its memory goes back before the engine sizes its pool
    systems = [run_parrot(args, pool, device, dtype), *systems, roofline(args, vocab, dtype, read_rate)]
    forked = {}
    if args.shared_prefix:
        for sharing in (True, False):
            release_memory(device)
            forked[sharing] = run_forked(args, pool, device, dtype, sharing)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"forked_decode": {"prefix_tokens": args.shared_prefix, "sharing_tok_s": forked.get(True, {}),
                                "no_sharing_tok_s": forked.get(False, {})},
              "device": name, "shape": args.config, "dtype": str(dtype), "prompt_len": args.prompt_len, "output_len": args.output_len,
              "read_gbps": read_rate, "systems": [asdict(s) for s in systems]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_engine.json").write_text(json.dumps(result, indent=2))
    head = "| system | prefill tok/s | " + " | ".join(f"decode b{b} tok/s" for b in args.batches) + " |"
    rows = [f"| {s.name} | {s.prefill_tok_s:.0f} | " + " | ".join(f"{s.decode_tok_s[b]:.0f}" for b in args.batches) + " |" for s in systems]
    (args.out / "gpu_engine.md").write_text(
        f"{args.config} (random weights), {dtype}, on {name}; prompts {args.prompt_len}, outputs {args.output_len}; read rate "
        f"{read_rate:.0f} GB/s.\n\n{head}\n|{'---|' * (2 + len(args.batches))}\n" + "\n".join(rows) + "\n"
        + (f"\nForks of one {args.shared_prefix}-token parent (8 own tokens each), decode tok/s:\n\n| batch | sharing | no sharing | ratio |\n"
           "|---|---|---|---|\n" + "".join(f"| {b} | {forked[True][b]:.0f} | {forked[False][b]:.0f} | {forked[True][b] / forked[False][b]:.2f}x |\n"
                                          for b in forked[True]) if forked else ""))
    ours, roof = systems[0], systems[-1]
    parts = [f"batch{b} {ours.decode_tok_s[b]:.0f} tok/s ({ours.decode_tok_s[b] / roof.decode_tok_s[b]:.0%} of roofline"
             + (f", {ours.decode_tok_s[b] / systems[1].decode_tok_s[b]:.2f}x transformers)" if len(systems) == 3 else ")")
             for b in args.batches]
    prefill = f"prefill {ours.prefill_tok_s:.0f} tok/s" + (f" ({ours.prefill_tok_s / systems[1].prefill_tok_s:.2f}x transformers)" if len(systems) == 3 else "")
    sharing = "".join(f", forks b{b} {forked[True][b] / forked[False][b]:.2f}x with sharing" for b in forked.get(True, {}))
    print(f"gpu-engine ({args.config}, {name}): " + ", ".join(parts) + f", {prefill}{sharing}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
