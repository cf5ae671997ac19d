"""The built-in engine: fill / generate / free_context / stats over forkable contexts.

Jobs from many contexts are batched into one forward step (continuous batching).
The step runs in a worker thread so the event loop keeps accepting work; all
scheduling state is touched only on the event loop, between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from parrot.engine.attention import AttentionBackend, CpuPagedAttention
from parrot.engine.cuda_graphs import DecodeGraphs, GraphMemory, graph_memory
from parrot.engine.engine_config import EngineConfig
from parrot.engine.device import (
    bf16_matmul_rows,
    kv_cache_dtype,
    kv_pool_bytes,
    precision_summary,
    prompt_attention_dtype,
    resolve_device,
    step_activation_bytes,
)
from parrot.engine.cpu_kernels import cpu_kernels_available
from parrot.engine.kv_cache import BlockPool, ContextTable
from parrot.engine.loader import load_config, load_state_dict, resolve_model_dir
from parrot.engine.model import LlamaModel
from parrot.engine.model_runner import KVCacheTensors, ModelRunner
from parrot.engine.outputs import EngineStats, FinishReason, GeneratedToken, TokenLogprobs
from parrot.engine.prefix_cache import PrefixCache
from parrot.engine.random_weights import random_model
from parrot.engine.shared_prefix_attention import SharedPrefixCpuAttention
from parrot.engine.triton_attention import TritonSharedPrefixAttention
from parrot.engine.sampler import SamplingParams, StopChecker, check_logprobs
from parrot.engine.scheduler import PRIORITY_NORMAL, BatchScheduler, Job, JobKind, ScheduledChunk, SchedulerConfig, StepPlan
from parrot.engine.step_profile import LatencyStepRules, StepCost, StepProfile
from parrot.engine.step_trace import StepRecord, StepTrace
from parrot.engine.structured import GrammarCompiler
from parrot.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from parrot.errors import ContextError, KVCacheExhaustedError, PromptTooLongError, SamplingError

log = logging.getLogger(__name__)

# how long jobs blocked on KV memory wait for some context to be freed before they fail
FREE_GRACE_SECONDS = 0.1
# the larger of the two step sizes the engine times as it starts (_calibrate_step_cost), and
# how often it times each (the quickest counts: one slow step on a busy machine says nothing)
CALIBRATION_TOKENS = 128
CALIBRATION_REPEATS = 5


@dataclass
class _JobChannel:
    """Where a job's results go: a queue of tokens, or a future for a fill."""

    queue: asyncio.Queue | None = None
    done: asyncio.Future | None = None


@dataclass
class _Counters:
    tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    busy: float = 0.0
    peak_batch_blocks: int = 0
    context_locks: dict[str, asyncio.Lock] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        # Every forward step runs in this one thread, and so does the model's loading. With
        # GNU OpenMP each thread that runs parallel torch work keeps a team of its own, and
        # while a second team exists the teams stop spinning between parallel regions: each
        # of a step's ~120 matmuls then waits for its threads to wake. A batch-1 sweep of the
        # weights took 16.9 ms from a second thread against 11.8 from the only one; decode
        # steps of 1/4/8/16 rows went from 22/43/61/77 ms (steps in asyncio's pool threads,
        # the model loaded in the caller's) to 18/26/36/60 ms.
        # opened first: a path that cannot be written fails before minutes of loading, not after
        self._trace = StepTrace(self.config.step_trace) if self.config.step_trace else None
        threads = self.config.threads or torch.get_num_threads()  # the creating thread's, as before
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parrot-step")
        self._step_thread.submit(self._build, threads).result()
        self._channels: dict[int, _JobChannel] = {}
        self._counters = _Counters()
        self._step_profile = StepProfile()
        self._step_thread.submit(self._calibrate_step_cost).result()
        self._trace_start = time.perf_counter()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._closed = False

    def _build(self, threads: int) -> None:
        """Loads the model, sizes the KV pool, captures decode graphs: in the step thread."""
        config = self.config
        torch.set_num_threads(threads)
        model_dir = resolve_model_dir(config.model)
        self.model_config = load_config(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        dtype = config.torch_dtype
        self.device = device = resolve_device(config.device)
        if device.type == "cpu":
            cpu_kernels_available()  # built now (first start on this machine), not inside the first step
        if config.random_weights is not None:
            vocab = max(self.model_config.vocab_size, self.tokenizer.vocab_size)
            self.model_config, state = random_model(config.random_weights, vocab, self.model_config.eos_token_ids, dtype, device=device)
        else:
            state = {name: tensor.to(device) for name, tensor in load_state_dict(model_dir, dtype).items()}
        bf16_rows = bf16_matmul_rows(config.cpu_bf16, device)
        prompt_dtype = prompt_attention_dtype(config.prompt_attention_dtype, dtype)
        self.model = LlamaModel(self.model_config, state, self._attention(device, prompt_dtype), dtype, bf16_rows)
        del state
        kv_dtype = kv_cache_dtype(config.kv_dtype, dtype)
        per_block = KVCacheTensors.bytes_per_block(self.model_config, config.block_size, kv_dtype)
        use_graphs = config.decode_graphs if config.decode_graphs is not None else device.type == "cuda"
        graph_needs = graph_memory(config.max_seqs_per_step, config.shared_prefix_attention) if use_graphs else GraphMemory(0, 0)
        activations = step_activation_bytes(self.model_config, config.max_tokens_per_step, config.max_seqs_per_step, dtype,
                                            graph_needs.part_rows, graph_needs.logits_rows)
        num_blocks = max(1, kv_pool_bytes(device, config.kv_memory_gb, config.gpu_memory_utilization, activations) // per_block)
        # one block past the pool's: the slots of a static decode batch's padding rows
        self.kv = KVCacheTensors(self.model_config, num_blocks + 1, config.block_size, kv_dtype, device)
        self.precision = precision_summary(dtype, bf16_rows, kv_dtype, prompt_dtype)
        log.info("%s on %s: %s; %d KV blocks of %d tokens", model_dir.name, device, self.precision, num_blocks, config.block_size)
        self.contexts = ContextTable(BlockPool(num_blocks, config.block_size), self.kv.copy_block)
        self.prefix_cache = PrefixCache(self.contexts) if config.prefix_caching else None
        self.grammars = GrammarCompiler(self.tokenizer.to_json(), self.model_config.vocab_size, self.tokenizer.vocab_size,
                                        self.model_config.eos_token_ids)
        self.scheduler = BatchScheduler(
            self.contexts, SchedulerConfig(config.max_tokens_per_step, config.max_seqs_per_step, config.latency_max_tokens_per_step),
            reclaim=self.prefix_cache.evict if self.prefix_cache is not None else None,
        )
        self._prefix_in_use: dict[str, str] = {}  # context -> cached prefix it forked from
        self._root_prompt: dict[str, int] = {}  # root context -> tokens of its first fill (cached once computed)
        self._retain_when_sampled: set[str] = set()  # root contexts whose prompt their generate computes
        self._score_ids = itertools.count()  # names of the contexts `score` computes prompts in
        self._prefix_fills: dict[tuple[int, ...], asyncio.Future] = {}
        # steps whose sequences the attention would group (a shared prefix this long) replay graphs of their own
        shared = self.model.attention.min_shared_tokens if config.shared_prefix_attention else None
        graphs = DecodeGraphs(self.model, self.kv, num_blocks, config.max_seqs_per_step, shared) if use_graphs else None
        self.runner = ModelRunner(self.model, self.kv, graphs)

    def _calibrate_step_cost(self) -> None:
        """Seeds the step cost with steps of two sizes on a scratch context, so the rules that
        depend on it (StepBudget: the cap beside latency work, later apps capped beside the
        first app's decodes) hold from the first request. Fitted from real steps only, an
        engine whose steps were all full (a backlog of prompts) never learned its cost and ran
        without those rules: in mixed on this CPU the quiet engine once ran 12 s of its 17 s
        that way, and the jobs ended together (benchmarks/RESULTS.md, mixed). Both steps sample a token
        from their last row, as a decode step and a prompt's last chunk do. Real steps refine
        the fit from then on (older steps weigh less). On a GPU the 1-token step replays a
        decode graph while steps with prompt tokens run eagerly, so the fixed cost it finds is
        a graph's: the lower bound, which real mixed steps then raise."""
        pool = self.contexts.pool
        large = min(CALIBRATION_TOKENS, self.config.max_tokens_per_step, pool.num_free * pool.block_size,
                    self.model_config.max_position_embeddings)
        ctx = self.contexts.create("parrot-step-calibration", None)
        try:
            ctx.token_ids.extend([0] * large)
            slots = self.contexts.reserve_slots(ctx, large)
            job = Job(JobKind.GENERATE, ctx, PRIORITY_NORMAL, arrival=-1, sampling=SamplingParams())  # greedy
            plans = {length: StepPlan([ScheduledChunk(job, 0, length, slots[:length], wants_logits=True)]) for length in (1, large)}
            for plan in plans.values():
                self.runner.run(plan)  # one-time costs of each path (allocations, kernel set-up)
            for length, plan in plans.items():
                seconds = min(self._timed(plan) for _ in range(CALIBRATION_REPEATS))  # the quickest: the least noise
                self._step_profile.seed(length, seconds)
        finally:
            self.contexts.free(ctx.context_id)
        cost = self._step_profile.cost()
        if cost is None:
            self._step_profile = StepProfile()  # too few tokens to tell the costs apart: real steps decide
        else:
            self.scheduler.rules = self._latency_rules(cost)

    def _timed(self, plan: StepPlan) -> float:
        started = time.perf_counter()
        self.runner.run(plan)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _attention(self, device: torch.device, prompt_dtype: torch.dtype | None) -> AttentionBackend:
        if device.type == "cuda":  # every row through the Triton kernel; "no sharing" groups nothing
            return TritonSharedPrefixAttention(min_shared_tokens=128 if self.config.shared_prefix_attention else 2**62)
        plain = CpuPagedAttention(prompt_dtype=prompt_dtype)
        return SharedPrefixCpuAttention(plain=plain) if self.config.shared_prefix_attention else plain

    # ---- primitives -------------------------------------------------------

    async def fill(self, context_id: str, parent_context_id: str | None, token_ids: list[int], priority: int = PRIORITY_NORMAL,
                   shared_prefix_len: int = 0, then_generate: bool = False) -> None:
        """Appends token_ids to the context (created, forked from the parent, if new) and computes their KV.

        A new root context forks from the longest cached prefix of token_ids; its
        first shared_prefix_len tokens (a prefix other contexts will share) are
        cached as a prefix of their own first. With then_generate (the caller's next
        call is `generate` on this context) the tokens are computed by that generate's
        steps instead, whose last prompt step samples the first token: no step of
        other work runs between the prompt and its first token, and the last prompt
        token is not computed twice.
        """
        if context_id not in self.contexts:
            # refused before the context exists, so that a refused fill leaves nothing behind
            base = len(self.contexts.get(parent_context_id).token_ids) if parent_context_id is not None else 0
            self._check_length(base + len(token_ids))
            self._check_fits_pool(base + len(token_ids))
            if parent_context_id is not None:
                async with self._lock(parent_context_id):
                    self.contexts.create(context_id, parent_context_id)
            elif self.prefix_cache is not None:
                token_ids = await self._create_from_cache(context_id, token_ids, shared_prefix_len, priority)
            else:
                self.contexts.create(context_id, None)
        elif parent_context_id is not None and self.contexts.get(context_id).parent is not self.contexts.get(parent_context_id):
            raise ContextError(f"context {context_id!r} exists with another parent")
        async with self._lock(context_id):
            ctx = self.contexts.get(context_id)
            self._check_length(len(ctx.token_ids) + len(token_ids))
            self._check_fits_pool(len(ctx.token_ids) + len(token_ids))
            ctx.token_ids.extend(token_ids)
            if ctx.num_pending > 0 and then_generate:
                if context_id in self._root_prompt:
                    self._retain_when_sampled.add(context_id)
                return
            if ctx.num_pending > 0:
                channel = _JobChannel(done=asyncio.get_running_loop().create_future())
                job = self.scheduler.submit(JobKind.FILL, ctx, priority)
                await self._run_job(job, channel)
                try:
                    await channel.done
                finally:
                    # a cancelled caller stops its job (the context keeps the tokens, computed by its next job):
                    # a job never outlives the context lock its caller held
                    self._finish(job, None)
            if context_id in self._root_prompt:
                # cached as soon as it is computed, not only when the request ends: identical prompts
                # that come while it generates fork from it instead of each prefilling it again (under
                # a stream of them, every miss lengthened the steps that delayed the first one's end)
                self._retain_prompt(context_id, while_running=True)

    async def generate(self, context_id: str, sampling: SamplingParams, priority: int = PRIORITY_NORMAL) -> AsyncIterator[GeneratedToken]:
        """Streams tokens sampled after the context; they are appended to it as they come."""
        async with self._lock(context_id):
            ctx = self.contexts.get(context_id)
            if not ctx.token_ids:
                raise ContextError(f"context {context_id!r} is empty: fill it before generating")
            # refusals first: a refused request leaves the context as it was
            if not self._in_vocabulary(sampling.token_ids_named):
                raise SamplingError(f"token ids (stop_token_ids, allowed_token_ids, logit_bias) must be from 0 to "
                                    f"{self.model_config.vocab_size - 1}, this model's vocabulary")
            grammar = None
            if sampling.structured is not None:  # a large grammar takes a while to compile: off the event loop
                grammar = await asyncio.to_thread(self.grammars.compile, sampling.structured, self.tokenizer.encode)
            if ctx.num_pending == 0:
                ctx.num_computed -= 1  # recompute the last token to get its logits
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator().manual_seed(sampling.seed)
            channel = _JobChannel(queue=asyncio.Queue())
            job = self.scheduler.submit(
                JobKind.GENERATE,
                ctx,
                priority,
                sampling=sampling,
                detokenizer=IncrementalDetokenizer(self.tokenizer),
                stop_checker=StopChecker(sampling.stop),
                generator=generator,
                grammar=grammar,
            )
            await self._run_job(job, channel)
            try:
                while True:
                    item = await channel.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        return
            finally:
                # the consumer stopped early (closed the generator, was cancelled): stop sampling
                self._finish(job, None)

    async def score(self, token_ids: list[int], top: int = 0, priority: int = PRIORITY_NORMAL) -> list[TokenLogprobs]:
        """The log probability of each token after the first given the tokens before it, with the
        `top` likeliest tokens at its position (a prompt's log probabilities: OpenAI's echo).
        Computed in a context of its own that no cached prefix serves, since a position whose KV
        comes from the cache is never computed and has no logits; scheduled as a fill, and freed
        when done."""
        check_logprobs(top)
        if not token_ids:
            raise ContextError("there is nothing to score: the prompt has no tokens")
        if not self._in_vocabulary(token_ids):
            raise ContextError(f"token ids must be from 0 to {self.model_config.vocab_size - 1}, this model's vocabulary")
        self._check_length(len(token_ids))
        self._check_fits_pool(len(token_ids))
        context_id = f"__score__{next(self._score_ids)}"
        while context_id in self.contexts:  # a caller named one of its contexts so
            context_id = f"__score__{next(self._score_ids)}"
        ctx = self.contexts.create(context_id, None)
        ctx.token_ids.extend(token_ids)
        channel = _JobChannel(done=asyncio.get_running_loop().create_future())
        job = self.scheduler.submit(JobKind.SCORE, ctx, priority, score_top=top)
        try:
            await self._run_job(job, channel)
            await channel.done
        finally:
            self._finish(job, None)
            self.free_context(context_id)
        return [job.scores[position] for position in range(len(token_ids) - 1)]

    def _in_vocabulary(self, token_ids: Iterable[int]) -> bool:
        return all(0 <= t < self.model_config.vocab_size for t in token_ids)

    async def _fill_prefix(self, prefix_id: str, token_ids: list[int], priority: int) -> None:
        """Computes a shared prefix's context and caches it; frees it if that fails."""
        try:
            await self.fill(prefix_id, None, token_ids, priority)
        except BaseException:
            if prefix_id in self.contexts:
                self.free_context(prefix_id)
            raise
        self.prefix_cache.insert(prefix_id)

    def _prefix_fill_done(self, key: tuple[int, ...], task: asyncio.Future) -> None:
        del self._prefix_fills[key]
        if not task.cancelled() and task.exception() is not None:  # read here too: its starter may have gone
            log.info("prefilling a shared prefix of %d tokens failed: %s", len(key), task.exception())

    async def _create_from_cache(self, context_id: str, token_ids: list[int], shared_prefix_len: int, priority: int) -> list[int]:
        """Creates a root context from the longest cached prefix; returns the tokens left to fill."""
        cache = self.prefix_cache
        aligned = shared_prefix_len // self.config.block_size * self.config.block_size
        match = cache.longest(token_ids)
        if aligned and (match is None or match.num_tokens < aligned):
            key = tuple(token_ids[:aligned])
            in_flight = self._prefix_fills.get(key)
            if in_flight is not None:  # another request is prefilling this very prefix
                # its failure is its starter's to report: this request computes what is missing itself
                await asyncio.wait({in_flight})
            else:
                prefix_id = cache.new_context_id()
                self.contexts.create(prefix_id, match.context_id if match else None, match.num_tokens if match else None)
                # the engine's own task, not this caller's: a caller that hangs up (one of n choices
                # of a prompt, say) leaves the prefix to be computed and cached for the others
                fill = asyncio.ensure_future(self._fill_prefix(prefix_id, token_ids[match.num_tokens if match else 0 : aligned], priority))
                self._prefix_fills[key] = fill
                fill.add_done_callback(lambda task: self._prefix_fill_done(key, task))
                await asyncio.shield(fill)
            match = cache.longest(token_ids)
        # recorded as the context comes to exist: a fill that fails or is cancelled before leaves nothing
        self._root_prompt[context_id] = len(token_ids)
        if match is None:
            self.contexts.create(context_id, None)
            return token_ids
        self.contexts.create(context_id, match.context_id, match.num_tokens)
        cache.acquire(match.context_id)
        cache.hits_tokens += match.num_tokens
        self._prefix_in_use[context_id] = match.context_id
        return token_ids[match.num_tokens :]

    def _retain_prompt(self, context_id: str, while_running: bool = False, sampled: bool = False) -> None:
        """Keeps the whole blocks of a root context's prompt as a cached prefix: once computed
        (`while_running`) and again as the context is freed. While it runs, the block holding its
        last computed token stays out, unless that token was `sampled` from already (a prompt its
        generate computed): a generate after a plain fill computes that token again, and a shared
        block would be copied first."""
        prompt = self._root_prompt.get(context_id, 0) if while_running else self._root_prompt.pop(context_id, 0)
        ctx = self.contexts.get(context_id)
        computed = ctx.num_computed - 1 if while_running and not sampled else ctx.num_computed
        aligned = min(prompt, computed) // self.config.block_size * self.config.block_size
        if aligned <= 0:
            return
        known = self.prefix_cache.longest(ctx.token_ids[:aligned])
        if known is not None and known.num_tokens >= aligned:
            return
        prefix_id = self.prefix_cache.new_context_id()
        self.contexts.create(prefix_id, context_id, aligned)
        self.prefix_cache.insert(prefix_id)

    def clear_prefix_cache(self) -> None:
        """Drops every idle cached prefix (tests use it to see every block back)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def free_context(self, context_id: str) -> None:
        ctx = self.contexts.get(context_id)
        if self.prefix_cache is not None and self.prefix_cache.owns(context_id):
            raise ContextError(f"context {context_id!r} belongs to the prefix cache")
        if self.prefix_cache is not None and context_id in self._root_prompt and not ctx.freed:
            self._retain_prompt(context_id)
        self._retain_when_sampled.discard(context_id)
        if context_id in self._prefix_in_use:
            self.prefix_cache.release(self._prefix_in_use.pop(context_id))
        for job in [j for j in self.scheduler.jobs if j.ctx is ctx]:
            self._finish(job, ContextError(f"context {context_id!r} was freed while a job ran on it"))
        self.contexts.free(context_id)
        self._counters.context_locks.pop(context_id, None)
        if self._wakeup is not None:
            self._wakeup.set()

    @property
    def step_cost(self) -> StepCost | None:
        """The cost of a forward step fitted from the steps timed at start and those run since
        (older ones weigh less). None until steps of different sizes were seen, and again after
        a long stretch of same-sized steps; the scheduler then keeps its last rules."""
        return self._step_profile.cost()

    def stats(self) -> EngineStats:
        pool = self.contexts.pool
        c = self._counters
        cached = len(self.prefix_cache) if self.prefix_cache is not None else 0
        cached_blocks = self.prefix_cache.idle_blocks() if self.prefix_cache is not None else 0
        # the rules the scheduler runs by: a long stretch of same-sized steps can fade the fit
        # out, and the engine keeps its last rules then; the manager must weigh those
        rules = self.scheduler.rules
        return EngineStats(len(self.contexts) - cached, len(self.scheduler.jobs), pool.num_blocks, pool.num_free, pool.block_size, c.tokens, c.steps, c.preemptions, c.busy, cached,
                           c.peak_batch_blocks, cached_blocks, rules.prefill_share, self.config.max_tokens_per_step, self.config.max_seqs_per_step,
                           rules.latency_seqs)

    def _latency_rules(self, cost: StepCost | None) -> LatencyStepRules:
        return LatencyStepRules.for_cost(cost, self.config.latency_max_tokens_per_step, self.config.max_tokens_per_step)

    async def close(self) -> None:
        """Stops the step loop and its thread; jobs still queued fail, and so does any job after."""
        self._closed = True
        for job in list(self.scheduler.jobs):
            self._finish(job, ContextError("the engine is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        # a step the cancel cut short still runs in the thread: waiting for it (off the event
        # loop) frees the thread, and with it the last references to the step's tensors
        await asyncio.to_thread(self._step_thread.shutdown, wait=True)
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def check_integrity(self) -> None:
        self.contexts.check_integrity()

    # ---- conveniences built on the primitives -----------------------------

    async def complete(self, prompt: str | list[int], sampling: SamplingParams, context_id: str | None = None) -> str:
        """One prompt in, its completion text out, on a temporary context."""
        context_id = context_id or f"complete-{id(object())}-{time.monotonic_ns()}"
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        try:
            await self.fill(context_id, None, token_ids)
            return "".join([t.text async for t in self.generate(context_id, sampling)])
        finally:
            if context_id in self.contexts:  # a refused fill never created it
                self.free_context(context_id)

    # ---- the step loop -----------------------------------------------------

    def _lock(self, context_id: str) -> asyncio.Lock:
        self.contexts.get(context_id)
        return self._counters.context_locks.setdefault(context_id, asyncio.Lock())

    def _check_length(self, length: int) -> None:
        if length > self.model_config.max_position_embeddings:
            raise PromptTooLongError(
                f"the context would hold {length} tokens; this model takes at most {self.model_config.max_position_embeddings}"
            )

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.contexts.pool.block_size)

    def _check_fits_pool(self, length: int) -> None:
        pool = self.contexts.pool
        if self._blocks_for(length) > pool.num_blocks:
            raise KVCacheExhaustedError(
                f"the context would hold {length} tokens, {self._blocks_for(length)} KV blocks of {pool.block_size} tokens, "
                f"but the whole KV pool has {pool.num_blocks} blocks; start the engine with more kv memory (kv_memory_gb) "
                f"or send fewer tokens"
            )

    def _exhausted(self, job: Job) -> KVCacheExhaustedError:
        pool = self.contexts.pool
        length = len(job.ctx.token_ids)
        if self._blocks_for(length) > pool.num_blocks:
            return KVCacheExhaustedError(
                f"out of KV memory: the context grew to {length} tokens, more than the whole pool holds "
                f"({pool.num_blocks} blocks of {pool.block_size} tokens); start the engine with more kv memory (kv_memory_gb)"
            )
        return KVCacheExhaustedError(
            f"out of KV memory: {pool.num_blocks} blocks of {pool.block_size} tokens, "
            f"all held by other contexts; free contexts or start the engine with more kv memory"
        )

    async def _freed_in_time(self, blocked: list[Job]) -> bool:
        """Nothing can run. Before failing jobs that would fit an emptier pool, wait briefly for a
        free_context: a job that just finished still holds its context until its owner, a turn
        of the event loop later, frees it."""
        pool = self.contexts.pool
        if all(self._blocks_for(len(job.ctx.token_ids)) > pool.num_blocks for job in blocked):
            return False
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), FREE_GRACE_SECONDS)
        except TimeoutError:
            return False
        return True

    async def _run_job(self, job: Job, channel: _JobChannel) -> None:
        self._channels[id(job)] = channel
        if self._closed:
            self._finish(job, ContextError("the engine is shut down"))
            return
        if self._wakeup is None or self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.create_task(self._step_loop())
        self._wakeup.set()

    async def _step_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._run_steps()
            except Exception as exc:  # a fault outside any one job's step: its jobs would otherwise wait for ever
                log.exception("the engine's step loop failed; failing its %d jobs", len(self.scheduler.jobs))
                for job in list(self.scheduler.jobs):
                    self._finish(job, exc)

    async def _run_steps(self) -> None:
        """Steps until no job is left."""
        while self.scheduler.jobs:
            plan = self.scheduler.schedule()
            self._counters.preemptions += len(plan.preempted)
            if not plan.chunks:
                if not plan.failed:
                    break
                # nothing can run: give owners a moment to free contexts, else fail the job in the way
                if not await self._freed_in_time(plan.failed):
                    for job in plan.failed:
                        self._finish(job, self._exhausted(job))
                continue
            started = time.perf_counter()
            try:
                result = await asyncio.get_running_loop().run_in_executor(self._step_thread, self.runner.run, plan)
            except Exception as exc:
                log.exception("forward step failed for %d jobs", len(plan.chunks))
                for chunk in plan.chunks:
                    self._finish(chunk.job, exc)
                continue
            elapsed = time.perf_counter() - started
            if self._trace is not None:
                self._trace.write(StepRecord.of(plan, started - self._trace_start, elapsed, result.replayed_graph))
            self._counters.busy += elapsed
            if not any(chunk.job.kind is JobKind.SCORE for chunk in plan.chunks):
                # a scored prompt's logits for every row cost what no other step's tokens do: it
                # would skew the fitted cost the latency cap is sized from
                self._step_profile.record(plan.num_tokens, elapsed)
            cost = self._step_profile.cost()
            if cost is not None:  # a stretch of same-sized steps leaves the last fitted rule standing
                self.scheduler.rules = self._latency_rules(cost)
            self._counters.steps += 1
            self._counters.tokens += plan.num_tokens
            batch_blocks = len({block for chunk in plan.chunks for block in chunk.job.ctx.block_table})
            self._counters.peak_batch_blocks = max(self._counters.peak_batch_blocks, batch_blocks)
            self._postprocess(plan, result)

    def _postprocess(self, plan, result) -> None:
        for chunk in plan.chunks:
            try:
                self._postprocess_chunk(chunk, result)
            except Exception as exc:  # one job's fault ends that job; the loop and the step's other jobs go on
                log.exception("after a step, context %s's job failed", chunk.job.ctx.context_id)
                self._finish(chunk.job, exc)

    def _postprocess_chunk(self, chunk: ScheduledChunk, result) -> None:
        job = chunk.job
        if job.ctx.freed or id(job) not in self._channels:
            return
        job.ctx.num_computed = max(job.ctx.num_computed, chunk.start + chunk.length)
        if job.kind is not JobKind.GENERATE:
            job.scores.update(result.scores.get(id(job), {}))
            if job.ctx.num_pending == 0:
                self._finish(job, None)
            return
        if chunk.wants_logits and job.ctx.context_id in self._retain_when_sampled:
            # a prompt filled for its generate is computed now: cached as a plain fill's is
            self._retain_when_sampled.discard(job.ctx.context_id)
            self._retain_prompt(job.ctx.context_id, while_running=True, sampled=True)
        token = result.sampled.get(id(job))
        if token is not None:
            self._on_token(job, token, result.logprobs.get(id(job)))

    def _on_token(self, job: Job, token: int, logprobs: TokenLogprobs | None = None) -> None:
        sampling = job.sampling
        job.num_generated += 1
        is_eos = token in sampling.stop_token_ids or (not sampling.ignore_eos and token in self.model_config.eos_token_ids)
        if job.grammar is not None:
            # an end token the grammar allowed ends the output even with ignore_eos: nothing more may follow
            is_eos = is_eos or token in job.grammar.end_token_ids
            try:
                job.grammar.check()
                if not is_eos:
                    job.grammar.accept(token)
            except SamplingError as exc:  # this output ends with the error; the step's other jobs go on
                self._finish(job, exc)
                return
        if is_eos:
            self._emit(job, GeneratedToken(token, job.stop_checker.flush(), FinishReason.STOP, logprobs))
            return
        job.ctx.token_ids.append(token)
        text = job.stop_checker.feed(job.detokenizer.push(token))
        if job.stop_checker.stopped:
            self._cut_at_stop(job)
            self._emit(job, GeneratedToken(token, text, FinishReason.STOP, logprobs))
        elif job.grammar is not None and job.grammar.complete:
            self._emit(job, GeneratedToken(token, text + job.stop_checker.flush(), FinishReason.STOP, logprobs))
        elif job.num_generated >= sampling.max_tokens or len(job.ctx.token_ids) >= self.model_config.max_position_embeddings:
            self._emit(job, GeneratedToken(token, text + job.stop_checker.flush(), FinishReason.LENGTH, logprobs))
        else:
            self._channels[id(job)].queue.put_nowait(GeneratedToken(token, text, logprobs=logprobs))

    def _cut_at_stop(self, job: Job) -> None:
        """Cuts the context back to its prompt and the output's kept text: text filled after
        this output then follows what the output's variable says, not the stop string (the
        prompt a request-level client would send next)."""
        kept = job.stop_checker.text
        ctx = job.ctx
        generated = ctx.token_ids[len(ctx.token_ids) - job.num_generated :]
        if self.contexts.forked_past(ctx, len(ctx.token_ids) - len(generated)):  # a fork reads these tokens' KV: leave them
            log.info("context %s has forks; its stop string stays in it", ctx.context_id)
            return
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        text = whole_text = ""
        whole = 0  # generated tokens whose text lies wholly inside `kept`
        for index, token in enumerate(generated):
            text += detokenizer.push(token)
            if not kept.startswith(text):
                break
            if detokenizer.read_offset == len(detokenizer.token_ids):  # no partial character held back
                whole, whole_text = index + 1, text
        self.contexts.truncate(ctx, len(ctx.token_ids) - len(generated) + whole)
        # the kept text's tail inside the token that held the stop string, to be prefilled with what comes next
        ctx.token_ids.extend(self.tokenizer.encode(kept[len(whole_text) :]))

    def _emit(self, job: Job, last: GeneratedToken) -> None:
        self._channels[id(job)].queue.put_nowait(last)
        self._finish(job, None)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        self.scheduler.remove(job)
        channel = self._channels.pop(id(job), None)
        if channel is None:
            return
        if channel.done is not None and not channel.done.done():
            if error is None:
                channel.done.set_result(None)
            else:
                channel.done.set_exception(error)
        elif channel.queue is not None and error is not None:
            channel.queue.put_nowait(error)
