"""The serve core on the real built-in engine (SmolLM2-135M): a DAG served inside the
server gives exactly the text that a client gets by calling the engine step by step.

The client side of each comparison renders every prompt itself (the previous step's
output pasted in) and calls the engine's request-level `complete()` with the same
greedy sampling settings, one request at a time, as an application without Parrot
would.

Two runtimes, each loaded once for the module:
- `P.Runtime(model="smollm2-135m")`, the embedded default, for DAGs whose calls run
  one after another (a chain): the engine then sees the same jobs in the same order
  as the step-by-step client, so even its batch-size-dependent numerics agree.
- the same model with `cpu_bf16="off"` (float32 at every batch size) for
  DAGs whose calls run side by side (map-reduce, diamond). The default engine may read
  weights as bf16 for small batches only (by CPU), so a request batched with others
  is computed in another precision than the same request alone, and a greedy token
  may flip on a near tie; that is the engine's speed trade-off, not the serve core's
  doing, so the exact engine isolates what this file checks.
"""

from __future__ import annotations

import pytest

import parrot as P
from parrot.backends.builtin import BuiltinEngineBackend
from parrot.engine.llm_engine import EngineConfig, LLMEngine
from parrot.engine.sampler import SamplingParams

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def default_module_runtime():
    with P.Runtime(model="smollm2-135m") as runtime:
        yield runtime


@pytest.fixture(scope="module")
def exact_module_runtime():
    engine = LLMEngine(EngineConfig(model="smollm2-135m", cpu_bf16="off"))
    with P.Runtime(backends=[BuiltinEngineBackend(engine, "exact-0")]) as runtime:
        yield runtime


def _in_use(runtime):
    runtime.make_current()
    yield runtime
    engine = runtime.manager.engines[0].engine
    engine.check_integrity()
    engine.clear_prefix_cache()  # idle cached prompt prefixes are kept on purpose; dropping them must return every block
    stats = engine.stats()
    assert stats.num_contexts == 0 and stats.num_jobs == 0, "the served DAG left contexts or jobs behind"
    assert stats.blocks_free == stats.blocks_total


@pytest.fixture
def default_runtime(default_module_runtime):
    yield from _in_use(default_module_runtime)


@pytest.fixture
def exact_runtime(exact_module_runtime):
    yield from _in_use(exact_module_runtime)


def complete(runtime, prompt: str, sampling: SamplingParams) -> str:
    """One request-level call, as a client without semantic variables makes it."""
    engine = runtime.manager.engines[0].engine
    return runtime._run(engine.complete(prompt, sampling))


def chat(user: str) -> str:
    """SmolLM2-Instruct's chat format around one user message, as the templates below spell it."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# fixed-length outputs (ignore_eos), as in the paper's benchmarks: every comparison
# covers MAX_TOKENS generated tokens, never an empty string

@P.semantic_function()
def summarize(chunk: P.Input, summary: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    Summarize in one sentence: {{chunk}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def refine(previous: P.Input, chunk: P.Input, summary: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    Here is a summary so far: {{previous}}
    Refine it with this new text: {{chunk}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def combine(a: P.Input, b: P.Input, c: P.Input, summary: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    Combine these three summaries into one.
    - {{a}}
    - {{b}}
    - {{c}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def design(task: P.Input, plan: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    You are a software architect. List the modules of {{task}}.<|im_end|>
    <|im_start|>assistant
    {{plan}}"""


@P.semantic_function()
def program(plan: P.Input, module: P.Input, code: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    You are a programmer. The design is: {{plan}}
    Write the {{module}} module in Python.<|im_end|>
    <|im_start|>assistant
    {{code}}"""


@P.semantic_function()
def review(first: P.Input, second: P.Input, verdict: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
    """<|im_start|>user
    You are a code reviewer. Review this code.
    {{first}}
    {{second}}<|im_end|>
    <|im_start|>assistant
    {{verdict}}"""


def sampling_of(fn) -> SamplingParams:
    (name,) = fn.output_order
    return fn.output_settings[name].sampling()


CHUNKS = [
    "The parrot is a bird that lives in warm forests and eats fruit and seeds.",
    "Many parrots can imitate human speech, and some learn hundreds of words.",
    "Parrots are social animals that live in flocks and can live for decades.",
]


def test_chain_matches_step_by_step(default_runtime) -> None:
    runtime = default_runtime
    summary = summarize(P.variable("chunk", CHUNKS[0]))
    for chunk in CHUNKS[1:]:
        summary = refine(summary, P.variable("chunk", chunk))
    served = summary.get(perf=P.LATENCY)
    assert [(c.state, c.objective) for c in runtime.dag().calls[-3:]] == [("done", "latency")] * 3

    expected = complete(runtime, chat(f"Summarize in one sentence: {CHUNKS[0]}"), sampling_of(summarize))
    for chunk in CHUNKS[1:]:
        expected = complete(runtime, chat(f"Here is a summary so far: {expected}\nRefine it with this new text: {chunk}"), sampling_of(refine))
    assert expected.strip()
    assert served == expected


def test_map_reduce_matches_step_by_step(exact_runtime) -> None:
    runtime = exact_runtime
    maps = [summarize(P.variable(f"chunk{i}", chunk)) for i, chunk in enumerate(CHUNKS)]
    final = combine(*maps)
    served_final = final.get(perf=P.LATENCY)
    served_maps = [m.get() for m in maps]
    calls = runtime.dag().calls[-4:]
    assert [c.objective for c in calls] == ["throughput"] * 3 + ["latency"]
    assert {c.task_group for c in calls[:3]} == {calls[3].call_id}

    expected_maps = [complete(runtime, chat(f"Summarize in one sentence: {chunk}"), sampling_of(summarize)) for chunk in CHUNKS]
    assert len(set(expected_maps)) == 3, "three different chunks should give three different summaries"
    assert served_maps == expected_maps
    prompt = chat("Combine these three summaries into one.\n" + "\n".join(f"- {m}" for m in expected_maps))
    assert served_final == complete(runtime, prompt, sampling_of(combine))


def test_diamond_matches_step_by_step(exact_runtime) -> None:
    runtime = exact_runtime
    plan = design(P.variable("task", "a snake game"))
    board = program(plan, P.variable("module", "board"))
    snake = program(plan, P.variable("module", "snake"))
    verdict = review(board, snake)
    served = [verdict.get(perf=P.LATENCY), plan.get(), board.get(), snake.get()]
    a, b, c, d = runtime.dag().calls[-4:]
    assert (a.objective, b.objective, c.objective, d.objective) == ("latency", "throughput", "throughput", "latency")

    expected_plan = complete(runtime, chat("You are a software architect. List the modules of a snake game."), sampling_of(design))
    expected_code = [
        complete(runtime, chat(f"You are a programmer. The design is: {expected_plan}\nWrite the {module} module in Python."), sampling_of(program))
        for module in ("board", "snake")
    ]
    expected_verdict = complete(
        runtime, chat(f"You are a code reviewer. Review this code.\n{expected_code[0]}\n{expected_code[1]}"), sampling_of(review)
    )
    assert expected_code[0] != expected_code[1]
    assert served == [expected_verdict, expected_plan, *expected_code]


def test_two_outputs_of_one_call_match_the_engine_primitives(default_runtime) -> None:
    """A call with two outputs is one context: fill, generate, fill the text between, generate."""
    runtime = default_runtime

    @P.semantic_function()
    def name_and_motto(thing: P.Input, name: P.Output(max_tokens=8, stop=("\n",)), motto: P.Output(max_tokens=MAX_TOKENS, ignore_eos=True)):
        """Invent a company that sells {{thing}}.
        Company name:{{name}}
        Motto:{{motto}}"""

    name, motto = name_and_motto(P.variable("thing", "parrot food"))
    served = (name.get(), motto.get())

    engine = runtime.manager.engines[0].engine

    async def step_by_step() -> tuple[str, str]:
        encode = engine.tokenizer.encode
        await engine.fill("reference", None, encode("Invent a company that sells parrot food.\nCompany name:"))
        try:
            first = "".join([t.text async for t in engine.generate("reference", name_and_motto.output_settings["name"].sampling())])
            await engine.fill("reference", None, encode("\nMotto:"))
            second = "".join([t.text async for t in engine.generate("reference", name_and_motto.output_settings["motto"].sampling())])
        finally:
            engine.free_context("reference")
        return first, second

    assert served == runtime._run(step_by_step())
    assert served[0].strip() and "\n" not in served[0] and served[1].strip()
