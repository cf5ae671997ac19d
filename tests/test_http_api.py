"""The manager and engine servers on loopback, driven by real clients.

One `parrot serve` process (manager + one engine process) serves the module;
clients are P.connect, the openai SDK, LangChain and plain httpx.
"""

from __future__ import annotations

import asyncio
import http.client
import math
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

import parrot as P
from parrot.backends.openai_compat import OpenAICompatibleBackend
from parrot.engine.sampler import SamplingParams
from parrot.server.launch import free_port

ENGINE_KEY = "test-engine-key"
KEYS = {"alice": "key-alice", "bob": "key-bob"}
MODEL = "smollm2-135m"


def start_server(extra_args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PARROT_API_KEYS": ",".join(f"{t}={k}" for t, k in KEYS.items()), "PARROT_ENGINE_KEY": ENGINE_KEY, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot.cli", "serve", "--port", str(port), "--kv-memory-gb", "0.25", *extra_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_for_engines(url: str, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            health = httpx.get(f"{url}/health", timeout=2).json()
            if len(health["engines"]) >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no {count} engine(s) registered at {url} within {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def step_traces(tmp_path_factory):
    return tmp_path_factory.mktemp("step-traces")


@pytest.fixture(scope="module")
def server(step_traces):
    proc, url = start_server(["--engines", "1", "--step-trace", str(step_traces)])
    try:
        wait_for_engines(url, 1, proc)
        yield url
    finally:
        stop(proc)


def test_idle_connection_outlives_the_clients_keep_alive(server):
    """A client's idle connection (httpx and the openai SDK keep one 5 s) is still open on the
    server after 6 s, so a call sent on it cannot meet a server closing it at the same instant."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read() and connection.sock is not None
        time.sleep(6)
        connection.auto_open = False  # a closed socket must fail the request, not be replaced
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def test_a_request_without_a_tenant_key_hears_401_whatever_its_body(server):
    """The key is checked before the body: a caller without one learns nothing of the schema."""
    bad_bodies = {"/v1/completions": {"bogus": 1}, "/v1/chat/completions": {"messages": "no"},
                  "/api/v1/sessions/s/calls": {"call_id": 7}, "/api/v1/sessions/s/batch": [], "/tokenize": {"prompt": 3},
                  "/detokenize": {"tokens": "x"}}
    for path, body in bad_bodies.items():
        keyless = httpx.post(f"{server}{path}", json=body, timeout=10)
        assert keyless.status_code == 401, (path, keyless.text)
        engine_key = httpx.post(f"{server}{path}", json=body, timeout=10, headers={"authorization": f"Bearer {ENGINE_KEY}"})
        assert engine_key.status_code == 403, (path, engine_key.text)
    assert httpx.post(f"{server}/v1/completions", json={"bogus": 1}, headers=auth("alice"), timeout=10).status_code == 400


def test_the_engine_process_traces_its_steps(server, step_traces):
    from parrot.engine.step_trace import read_trace

    response = httpx.post(f"{server}/v1/completions", headers=auth("alice"), timeout=120,
                          json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    records = read_trace(step_traces / "engine-0.jsonl")  # each step is on disk as it ends
    assert sum(r.decode_rows for r in records) >= 4 and sum(r.prefill_tokens for r in records) >= 4


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@P.semantic_function()
def write_code(task: P.Input, code: P.Output(max_tokens=12)):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@P.semantic_function()
def write_test(task: P.Input, code: P.Input, test: P.Output(max_tokens=12)):
    """You are an experienced QA engineer.
    You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


def snake_program() -> tuple[str, str]:
    task = P.variable("task", "a snake game")
    code = write_code(task)
    test = write_test(task, code)
    return code.get(perf=P.LATENCY), test.get(perf=P.LATENCY)


def test_remote_run_equals_embedded_run(server):
    with P.connect(server, api_key=KEYS["alice"]) as remote:
        remote_result = snake_program()
        dag = remote.dag()
    assert [c.state for c in dag.calls] == ["done", "done"]
    assert {c.objective for c in dag.calls} == {"latency"}
    remote.close()  # a second close does nothing
    with pytest.raises(P.UserError, match="this session is closed"):
        remote.dag()
    with P.Runtime(model=MODEL, kv_memory_gb=0.25):
        embedded_result = snake_program()
    assert remote_result == embedded_result
    assert all(text.strip() for text in remote_result)


@P.semantic_function()
def echo(text: P.Input, out: P.Output(max_tokens=2)):
    """Repeat {{input:text}}: {{output:out}}"""


@P.semantic_function()
def review(code: P.Input, verdict: P.Output(max_tokens=4, structured=P.StructuredOutput.choice(["approve", "revise"])),
           notes: P.Output(max_tokens=60, structured=P.StructuredOutput(P.StructureKind.JSON_SCHEMA, '{"type": "object", '
                           '"properties": {"issue": {"type": "string"}}, "required": ["issue"], "additionalProperties": false}'))):
    """Review this code: {{input:code}}
    Verdict: {{output:verdict}}
    Notes as JSON: {{output:notes}}"""


def test_a_program_holds_its_outputs_to_their_structures_on_the_server(server):
    """Structured outputs of a semantic function travel the session API and the engine wire: the
    verdict is one of its choices, and the notes parse against their schema."""
    import json

    with P.connect(server, api_key=KEYS["alice"]):
        verdict, notes = review("def add(a, b): return a - b")
        assert verdict.get(timeout=120) in ("approve", "revise")
        assert isinstance(json.loads(notes.get(timeout=120))["issue"], str)


@P.native_function
def shout(text: P.Input, loud: P.Output):
    return text.upper()


def test_a_remote_call_that_reads_a_native_functions_output_runs(server):
    """The native function sets its output from its own thread while the program waits on the
    call that reads it: the value reaches the server at once, not with the program's next request."""
    with P.connect(server, api_key=KEYS["alice"]):
        started = time.monotonic()
        assert echo(shout("name a colour")).get(timeout=60).strip() != ""
        assert time.monotonic() - started < 30


def test_a_program_steers_its_tokens_through_the_session_api(server, tokenizer):
    """logit_bias and allowed_token_ids of P.Output travel the session API and the engine wire."""
    [yes] = tokenizer.encode(" yes")
    [no] = tokenizer.encode(" no")

    @P.semantic_function()
    def answer(question: P.Input, forced: P.Output(max_tokens=3, logit_bias={yes: 100.0}),
               picked: P.Output(max_tokens=4, temperature=1.5, seed=1, ignore_eos=True, allowed_token_ids=(yes, no))):
        """Question: {{input:question}} Answer:{{output:forced}} Again:{{output:picked}}"""

    with P.connect(server, api_key=KEYS["alice"]):
        forced, picked = answer("Is water wet?")
        assert forced.get(timeout=60) == " yes" * 3
        assert set(picked.get(timeout=60).split()) <= {"yes", "no"}


def test_remote_program_is_one_batch_and_server_refusals_reach_get(server):
    with P.connect(server, api_key=KEYS["alice"]):
        seed = P.variable("seed")
        middle = echo(seed)
        echo(middle, out=seed)  # closes a cycle: seed -> middle -> seed
        with pytest.raises(P.UserError, match="cycle"):
            middle.get(timeout=30)
        assert echo("fine").get(timeout=60).strip() != ""


def test_openai_sdk_completion_chat_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("gpt-9")
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in completion.choices[0].text
    assert completion.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_sdk_top_k_usage_of_streams_and_fields_it_cannot_honour(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    prompt = "Once upon a time"  # under one KV block: every request computes it alike
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    def sampled(seed: int, **extra) -> str:
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, seed=seed,
                                         extra_body=extra).choices[0].text

    assert sampled(1) != sampled(2)  # hot sampling wanders...
    assert sampled(1, top_k=1) == sampled(2, top_k=1) == greedy  # ...unless top_k keeps only the likeliest token

    messages = [{"role": "user", "content": "Say hello."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, extra_body={"ignore_eos": True})
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert streamed[-1].usage.completion_tokens == 5 and streamed[-1].usage.total_tokens == 5 + streamed[-1].usage.prompt_tokens

    with pytest.raises(BadRequestError, match="does not implement echo: leave it out"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"echo": True})
    with pytest.raises(BadRequestError, match="does not implement suffix: leave it out"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, frequency_penalty=0.5, suffix="end")
    with pytest.raises(BadRequestError, match="response_format type 'yaml' is not one this server takes"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, response_format={"type": "yaml"})
    # the neutral values many clients send are taken
    neutral = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logprobs=False, frequency_penalty=0,
                                             presence_penalty=0, response_format={"type": "text"}, tool_choice="none")
    assert neutral.choices[0].message.content


def test_openai_sdk_logprobs_of_completions_and_chats_streamed_or_not(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    prompt = "Once upon a time"  # under one KV block: every request computes it alike
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True}).choices[0]
    lp = greedy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == greedy.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
        assert logprob == pytest.approx(max(top.values())) == pytest.approx(top[token])  # greedy: the likeliest
    hot = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.5, seed=3, logprobs=1).choices[0]
    assert all(v <= max(top.values()) + 1e-6 for v, top in zip(hot.logprobs.token_logprobs, hot.logprobs.top_logprobs))
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).choices[0].logprobs is None
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"logprobs": False}).choices[0].logprobs is None

    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    assert [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-3)

    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) and c.logprob == pytest.approx(c.top_logprobs[0].logprob)
               for c in content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                                 stream=True, extra_body={"ignore_eos": True}))
    streamed_tokens = [c.token for chunk in chunks if chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert streamed_tokens == [c.token for c in content]
    assert all(c.top_logprobs == [] for chunk in chunks if chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content)

    with pytest.raises(BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(BadRequestError, match="logprobs.* less than or equal to 20"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logprobs=21)


def test_openai_sdk_echo_gives_the_prompt_back_with_its_logprobs_as_lm_eval_asks(server, tokenizer):
    """lm-eval's loglikelihood request (echo, logprobs, one token or none): the prompt's tokens come back
    with their log probabilities, the first without one, then the completion's."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    context, continuation = "The capital of France is", " Paris"
    scored = client.completions.create(model=MODEL, prompt=context + continuation, max_tokens=1, temperature=0, logprobs=1,
                                       echo=True).choices[0]
    lp = scored.logprobs
    assert scored.text.startswith(context + continuation) and len(scored.text) > len(context + continuation)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:-1]) == context + continuation and lp.text_offset[-1] == len(context + continuation)
    assert all(v < 0 for v in lp.token_logprobs[1:])
    # the continuation is the likeliest next word, and likelier after its context than after another
    assert lp.tokens[-2] == " Paris" and max(lp.top_logprobs[-2], key=lp.top_logprobs[-2].get) == " Paris"
    other = client.completions.create(model=MODEL, prompt="My favourite colour is Paris", max_tokens=0, logprobs=0, echo=True).choices[0]
    assert other.text == "My favourite colour is Paris" and other.finish_reason == "length"
    assert other.logprobs.tokens[-1] == " Paris" and other.logprobs.token_logprobs[-1] < lp.token_logprobs[-2] - 1
    # the same numbers streamed, and the prompt alone back without logprobs
    chunks = list(client.completions.create(model=MODEL, prompt=context + continuation, max_tokens=1, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == scored.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    plain = client.completions.create(model=MODEL, prompt=[context, "Once"], max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(context) and plain.choices[1].text.startswith("Once")
    assert plain.choices[0].logprobs is None
    with pytest.raises(BadRequestError, match="max_tokens 0 generates nothing: it takes echo: true"):
        client.completions.create(model=MODEL, prompt=context, max_tokens=0)

    # token ids, as lm-eval sends by default: scored as given, the same numbers as the text's
    ids = tokenizer.encode(context + continuation)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True).choices[0]
    assert by_ids.text == scored.text and by_ids.logprobs.tokens == lp.tokens
    assert by_ids.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-3)
    both = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=0, logprobs=0, echo=True)
    assert [len(c.logprobs.tokens) for c in both.choices] == [len(ids), 3] and both.usage.prompt_tokens == len(ids) + 3
    with pytest.raises(BadRequestError, match="token ids must be from 0 to"):
        client.completions.create(model=MODEL, prompt=[ids[0], 10**9], max_tokens=1)


def test_openai_sdk_n_choices_of_completions_and_chats_streamed_or_not(server):
    """n choices of a prompt, as vLLM gives them: seeded choice j samples with seed + j; greedy
    ones are all the greedy answer; streams interleave the choices by index."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    prompt = "Once upon a time"  # under one KV block: every request computes it alike
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    same = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in same.choices] == [0, 1, 2] and [c.text for c in same.choices] == [greedy] * 3

    hot = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, extra_body={"ignore_eos": True})
    many = client.completions.create(n=4, seed=11, **hot)
    texts = [c.text for c in many.choices]
    assert len(set(texts)) > 1  # each choice samples with a seed of its own
    # choice j samples with seed + j: a request seeded one higher gives the same choices one place
    # earlier. (Compared with n=4 requests, not single ones: where the CPU multiplies in bf16, a
    # batch of another size rounds the logits otherwise, and a hot sample may then go another way.)
    shifted = [c.text for c in client.completions.create(n=4, seed=12, **hot).choices]
    assert shifted[:3] == texts[1:]
    single = client.completions.create(seed=11, **hot)
    assert many.usage.completion_tokens == 32 and many.usage.prompt_tokens == single.usage.prompt_tokens

    # a list of prompts, n each, streamed: choice i is prompt i // n's
    streamed = list(client.completions.create(model=MODEL, prompt=[prompt, "The capital of France is"], max_tokens=5,
                                              temperature=0, n=2, stream=True, stream_options={"include_usage": True}))
    whole = client.completions.create(model=MODEL, prompt=[prompt, "The capital of France is"], max_tokens=5, temperature=0, n=2)
    by_index = {i: "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(4)}
    assert by_index == {c.index: c.text for c in whole.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3] and by_index[0] != by_index[2]
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert streamed[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert sum(1 for c in streamed if c.choices and c.choices[0].finish_reason) == 4

    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, n=2, logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content
    assert len(chat.choices[1].logprobs.content) == chat.usage.completion_tokens // 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, n=2, stream=True))
    for choice in chat.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content

    with pytest.raises(BadRequestError, match="less than or equal to 64"):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=65)
    with pytest.raises(BadRequestError, match="at most 64 choices .prompts times n., not 2 x 40: split the request"):
        client.completions.create(model=MODEL, prompt=[prompt, prompt], max_tokens=2, n=40)


def test_openai_sdk_penalties_change_greedy_repeats_and_are_bounded(server, tokenizer):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    prompt = "one two three one two three one two three one two three"
    ask = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**ask).choices[0].text
    assert "one" in plain  # greedy decoding goes on with the pattern
    curbed = client.completions.create(**{**ask, "extra_body": {"ignore_eos": True, "repetition_penalty": 3.0}}).choices[0].text
    assert curbed != plain and "one two three" not in curbed
    assert client.completions.create(presence_penalty=2, frequency_penalty=2, **ask).choices[0].text != plain
    with pytest.raises(BadRequestError, match="presence_penalty"):
        client.completions.create(presence_penalty=2.5, **ask)
    with pytest.raises(BadRequestError, match="repetition_penalty"):
        client.completions.create(**{**ask, "extra_body": {"repetition_penalty": 0}})

    # vLLM's stop_token_ids and min_tokens
    [two] = tokenizer.encode(" two")
    stopped = client.completions.create(**{**ask, "extra_body": {"stop_token_ids": [two]}}).choices[0]
    assert stopped.finish_reason == "stop" and plain.startswith(stopped.text) and "two" not in stopped.text
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "What is 2+2? Answer with a number only."}], max_tokens=24, temperature=0)
    short = client.chat.completions.create(**chat)
    longer = client.chat.completions.create(**chat, extra_body={"min_tokens": short.usage.completion_tokens + 3})
    assert longer.usage.completion_tokens >= short.usage.completion_tokens + 3
    with pytest.raises(BadRequestError, match="min_tokens must be an integer from 0 to max_tokens"):
        client.chat.completions.create(**chat, extra_body={"min_tokens": 30})
    newer = {**chat, "max_tokens": None, "max_completion_tokens": 40}  # the newer name, as the SDK sends for o-series models
    assert client.chat.completions.create(**newer, extra_body={"min_tokens": 30}).usage.completion_tokens >= 30


def test_tokenize_counts_as_completions_and_chats_do_and_detokenize_reverses_it(server, tokenizer):
    """vLLM's /tokenize and /detokenize: a prompt's count is the usage a completion reports for it,
    messages count as the chat request does, and the ids read back as the text."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    post = lambda path, body: httpx.post(f"{server}{path}", json=body, headers=auth("alice"), timeout=30)  # noqa: E731
    prompt = "The capital of France is"
    counted = post("/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True}).json()
    assert counted["tokens"] == tokenizer.encode(prompt) and counted["count"] == len(counted["tokens"])
    assert "".join(counted["token_strs"]) == prompt and counted["max_model_len"] > 0
    used = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1).usage.prompt_tokens
    assert used == counted["count"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chat_count = post("/tokenize", {"messages": messages})
    assert chat_count.status_code == 200 and "token_strs" not in chat_count.json()
    assert chat_count.json()["count"] == client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens
    assert post("/detokenize", {"model": MODEL, "tokens": counted["tokens"]}).json() == {"prompt": prompt}
    # refusals say what to fix
    both = post("/tokenize", {"prompt": "a", "messages": messages})
    assert both.status_code == 400 and "one of them" in both.text
    assert post("/tokenize", {"model": "other", "prompt": "a"}).status_code == 404
    bad = post("/detokenize", {"tokens": [10**8]})
    assert bad.status_code == 400 and "must be from 0 to" in bad.json()["error"]["message"]


def test_openai_sdk_logit_bias_allowed_token_ids_and_min_p(server, tokenizer):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    ask = dict(model=MODEL, prompt="one two three one two three one two three", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**ask, logprobs=0).choices[0]
    first = plain.logprobs.tokens[0]
    [first_id] = tokenizer.encode(first)
    [yes] = tokenizer.encode(" yes")
    # OpenAI's logit_bias: -100 bans a token, +100 makes it come every time
    assert not client.completions.create(**ask, logit_bias={str(first_id): -100}).choices[0].text.startswith(first)
    assert client.completions.create(**ask, logit_bias={str(yes): 100}).choices[0].text == " yes" * 4
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=3, temperature=0)
    assert client.chat.completions.create(**chat, logit_bias={str(yes): 100}).choices[0].message.content == " yes" * 3
    # vLLM's allowed_token_ids: sampled hot, only they come
    [no] = tokenizer.encode(" no")
    hot = client.completions.create(**{**ask, "temperature": 1.5, "seed": 2, "max_tokens": 8,
                                       "extra_body": {"ignore_eos": True, "allowed_token_ids": [yes, no]}}).choices[0].text
    assert set(hot.split()) <= {"yes", "no"} and len(hot.split()) == 8
    # vLLM's min_p: 1.0 keeps the likeliest token alone, so hot sampling answers as greedy does
    kept = client.completions.create(**{**ask, "temperature": 1.8, "seed": 4, "extra_body": {"ignore_eos": True, "min_p": 1.0}})
    assert kept.choices[0].text == plain.text
    with pytest.raises(BadRequestError, match='logit_bias maps token ids, written as strings of digits'):
        client.completions.create(**ask, logit_bias={"yes": 5})
    with pytest.raises(BadRequestError, match="biases from -100 to 100"):
        client.completions.create(**ask, logit_bias={str(yes): 500})
    with pytest.raises(BadRequestError, match="must be from 0 to"):
        client.completions.create(**ask, logit_bias={str(10**8): 5})
    with pytest.raises(BadRequestError, match="min_p"):
        client.completions.create(**{**ask, "extra_body": {"min_p": 2}})


def test_openai_sdk_structured_outputs_parse_as_asked(server):
    """response_format (json_object, json_schema) and vLLM's structured_outputs and guided_* fields:
    the text matches, streamed or not; conflicting or broken specs are refused with a 400."""
    import json
    import re

    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    messages = [{"role": "user", "content": "Give me a person with a name and an age."}]
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    person_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0, response_format=person_format)
    person = json.loads(chat.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and chat.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0, stream=True,
                                                 response_format=person_format))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks)) == person
    anything = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100, temperature=0.7, seed=2, n=2,
                                              response_format={"type": "json_object"})
    # a sampled object may outrun max_tokens (finish_reason length, the text cut short, as in vLLM)
    assert all(c.message.content.startswith("{") for c in anything.choices)
    ended = [c for c in anything.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(c.message.content), dict) for c in ended)

    ask = dict(model=MODEL, prompt="Is Paris in France? Answer:", max_tokens=10, temperature=1.0)
    assert client.completions.create(**ask, extra_body={"structured_outputs": {"choice": [" yes", " no"]}}).choices[0].text in (" yes", " no")
    date = client.completions.create(**{**ask, "max_tokens": 20}, extra_body={"guided_regex": r" \d{4}-\d{2}-\d{2}"}).choices[0].text
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", date)

    with pytest.raises(BadRequestError, match="give one structure for the output, not 2"):
        client.completions.create(**ask, extra_body={"guided_regex": "a", "response_format": {"type": "json_object"}})
    with pytest.raises(BadRequestError, match="(?s)regex for structured output does not compile"):
        client.completions.create(**ask, extra_body={"guided_regex": "a(b"})
    with pytest.raises(BadRequestError, match="(?s)regex for structured output does not compile"):  # before a stream begins
        client.completions.create(**ask, stream=True, extra_body={"guided_regex": "a(b"})
    # vLLM's options for its backends are taken; json_object as vLLM spells it
    assert isinstance(json.loads(client.completions.create(**{**ask, "prompt": "A JSON object: ", "max_tokens": 40, "temperature": 0}, extra_body={
        "structured_outputs": {"json_object": True, "disable_fallback": False}}).choices[0].text), dict)
    with pytest.raises(BadRequestError, match="json_schema takes .* give its schema"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, response_format={"type": "json_schema"})


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}}


def test_openai_sdk_tool_calls_named_or_required_streamed_or_not(server):
    """A named function or tool_choice "required" gets a call whose arguments parse against the
    function's schema; streamed, a named call's arguments add up to the same text; with "auto"
    the model calls or answers in words."""
    import json

    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"])
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0, tools=[WEATHER, TIME])
    named = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = named.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    assert named.choices[0].message.content is None and named.choices[0].finish_reason == "stop" and call.id.startswith("call_")
    chunks = list(client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                 stream=True))
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert pieces[0].function.name == "get_weather" and pieces[0].id and all(p.id is None for p in pieces[1:])
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == arguments
    # cut short by max_tokens: the call as far as it got, streamed or not, finished by length
    weather = {"type": "function", "function": {"name": "get_weather"}}
    cut = client.chat.completions.create(**{**ask, "max_tokens": 3}, tool_choice=weather).choices[0]
    cut_chunks = list(client.chat.completions.create(**{**ask, "max_tokens": 3}, tool_choice=weather, stream=True))
    cut_pieces = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in cut_chunks if c.choices[0].delta.tool_calls)
    assert cut.finish_reason == cut_chunks[-1].choices[0].finish_reason == "length"
    whole_text = "".join(p.function.arguments or "" for p in pieces)
    assert cut.message.tool_calls[0].function.arguments == cut_pieces and whole_text.startswith(cut_pieces) and cut_pieces != whole_text

    required = client.chat.completions.create(**ask, tool_choice="required")
    [chosen] = required.choices[0].message.tool_calls
    assert chosen.function.name in ("get_weather", "get_time") and required.choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(chosen.function.arguments), dict)
    streamed = list(client.chat.completions.create(**ask, tool_choice="required", stream=True))
    [whole] = [c.choices[0].delta.tool_calls[0] for c in streamed if c.choices[0].delta.tool_calls]
    assert (whole.function.name, json.loads(whole.function.arguments)) == (chosen.function.name, json.loads(chosen.function.arguments))
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own stream helper puts the pieces back together
    with client.chat.completions.stream(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        [helped] = stream.get_final_completion().choices[0].message.tool_calls
    assert json.loads(helped.function.arguments) == arguments
    # a function whose schema refers to its own $defs (pydantic's nested models), among others
    trip = {"type": "function", "function": {"name": "book_trip", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "required": ["to"], "additionalProperties": False,
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                            "additionalProperties": False}}}}}
    booked = client.chat.completions.create(**{**ask, "tools": [trip, TIME], "messages": [{"role": "user", "content": "Book a trip to Rome."}]},
                                            tool_choice="required")
    [booking] = booked.choices[0].message.tool_calls
    assert booking.function.name in ("book_trip", "get_time") and isinstance(json.loads(booking.function.arguments), dict)

    # the call and its result go back into the conversation
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0).choices[0].message.content

    # auto, OpenAI's default where tools are given: a call, or an answer in words that does not start with "{";
    # streamed, the same either way
    for question in ("What is the weather in Paris?", "Say hello to me."):
        auto = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0, tools=[WEATHER, TIME])
        answer = client.chat.completions.create(**auto).choices[0]
        pieces = [c.choices[0] for c in client.chat.completions.create(**auto, stream=True)]
        if answer.message.tool_calls:
            [made] = answer.message.tool_calls
            assert made.function.name in ("get_weather", "get_time") and isinstance(json.loads(made.function.arguments), dict)
            assert answer.finish_reason == "tool_calls" and pieces[-1].finish_reason == "tool_calls"
            [sent] = [p.delta.tool_calls[0] for p in pieces if p.delta.tool_calls]
            assert (sent.function.name, sent.function.arguments) == (made.function.name, made.function.arguments)
        else:
            assert answer.message.content and not answer.message.content.startswith("{") and answer.finish_reason != "tool_calls"
            assert "".join(p.delta.content or "" for p in pieces) == answer.message.content
            assert not any(p.delta.tool_calls for p in pieces) and pieces[-1].finish_reason == answer.finish_reason
    with pytest.raises(BadRequestError, match="names 'get_news', which is not among the tools: get_weather, get_time"):
        client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_news"}})
    with pytest.raises(BadRequestError, match="drop response_format"):
        client.chat.completions.create(**ask, tool_choice="required", response_format={"type": "json_object"})


def test_langchain_structured_output_by_function_calling_and_by_json_schema(server):
    """LangChain's with_structured_output, both ways it asks: a named tool call, and a json_schema
    response_format; each answer parses into the model class."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        celsius: int

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"], model=MODEL, temperature=0, max_tokens=40)
    for method in ("function_calling", "json_schema"):
        answer = llm.with_structured_output(Weather, method=method).invoke("The weather in Paris: 18 degrees. Report it.")
        assert isinstance(answer, Weather) and isinstance(answer.celsius, int), method


def test_langchain_chat_openai_invoke(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"], model=MODEL, temperature=0, max_tokens=16)
    reply = llm.invoke("What is the capital of France?")
    assert "Paris" in reply.content


def test_variable_streams_over_sse(server):
    headers = auth("alice")
    with httpx.Client(base_url=server, headers=headers, timeout=60) as http:
        sid = http.post("/api/v1/sessions").json()["session_id"]
        http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "q", "name": "q", "value": "France"}).raise_for_status()
        http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "a", "name": "a"}).raise_for_status()
        call = {"call_id": "c1", "function": "capital", "template": "The capital of {{input:q}} is{{output:a}}",
                "inputs": [{"name": "q", "var_id": "q"}], "outputs": [{"name": "a", "var_id": "a", "sampling": {"max_tokens": 6}}]}
        http.post(f"/api/v1/sessions/{sid}/calls", json=call).raise_for_status()
        deltas = []
        with http.stream("GET", f"/api/v1/sessions/{sid}/variables/a/stream") as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "delta":
                    import json

                    deltas.append(json.loads(line[5:])["text"])
        value = http.get(f"/api/v1/sessions/{sid}/variables/a").json()
        assert value["ready"] and "".join(deltas) == value["value"] and "Paris" in value["value"]


def test_tenants_cannot_see_each_other(server):
    with httpx.Client(base_url=server, timeout=30) as http:
        sid = http.post("/api/v1/sessions", headers=auth("alice")).json()["session_id"]
        http.post(f"/api/v1/sessions/{sid}/variables", headers=auth("alice"), json={"var_id": "x", "value": "secret"}).raise_for_status()
        probes = [
            ("GET", f"/api/v1/sessions/{sid}/dag", None),
            ("GET", f"/api/v1/sessions/{sid}/variables/x?timeout=0", None),
            ("PUT", f"/api/v1/sessions/{sid}/variables/x", {"value": "overwrite"}),
            ("POST", f"/api/v1/sessions/{sid}/variables", {"var_id": "y"}),
            ("POST", f"/api/v1/sessions/{sid}/variables/x/fail", {"message": "gone"}),
            ("GET", f"/api/v1/sessions/{sid}/variables/x/stream", None),
            ("POST", f"/api/v1/sessions/{sid}/calls", {"call_id": "c", "function": "f", "template": "{{input:x}} {{output:y}}",
                                                       "inputs": [{"name": "x", "var_id": "x"}], "outputs": [{"name": "y", "var_id": "y"}]}),
            ("POST", f"/api/v1/sessions/{sid}/batch", {"ops": [{"create_variable": {"var_id": "z"}}]}),
            ("POST", f"/api/v1/sessions/{sid}/wait", {"var_id": "x", "timeout": 0}),
            ("DELETE", f"/api/v1/sessions/{sid}", None),
        ]
        for method, path, body in probes:
            as_bob = http.request(method, path, headers=auth("bob"), json=body)
            missing = http.request(method, path.replace(sid, "s-0000000000000000"), headers=auth("bob"), json=body)
            assert as_bob.status_code == missing.status_code == 404
            assert as_bob.json()["error"]["message"].replace(sid, "ID") == missing.json()["error"]["message"].replace("s-0000000000000000", "ID")
        assert http.get(f"/api/v1/sessions/{sid}/variables/x", headers=auth("alice")).json()["value"] == "secret"
        assert http.get(f"/api/v1/sessions/{sid}/dag").status_code == 401
        assert http.get(f"/api/v1/sessions/{sid}/dag", headers={"authorization": "Bearer nope"}).status_code == 401
        assert http.post("/api/v1/sessions", headers={"authorization": f"Bearer {ENGINE_KEY}"}).status_code == 403
        # a tenant's key where an engine's is needed: refused as a permission, not as a bad request
        refused = http.post("/api/v1/engines/register", headers=auth("alice"), json={"name": "e", "url": "http://127.0.0.1:9", "model": "m"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        # ... whatever the body: the key is checked before the body is
        malformed = http.post("/api/v1/engines/register", headers=auth("alice"), json={"name": 7})
        assert malformed.status_code == 403 and malformed.json()["error"]["type"] == "permission_error"
        # no key and a bad body: the key is what the caller hears about first
        keyless = http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": 7})
        assert keyless.status_code == 401 and keyless.json()["error"]["type"] == "authentication_error"
        assert http.post(f"/api/v1/sessions/{sid}/variables", headers=auth("alice"), json={"var_id": 7}).status_code == 400


def test_bad_payloads_get_4xx_with_a_message_and_the_server_keeps_serving(server):
    headers = auth("alice")
    with httpx.Client(base_url=server, headers=headers, timeout=30) as http:
        sid = http.post("/api/v1/sessions").json()["session_id"]
        http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "t", "value": "x"}).raise_for_status()
        http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": "o"}).raise_for_status()
        def call(template, **extra):
            body = {"call_id": f"c{time.monotonic_ns()}", "function": "f", "template": template,
                    "inputs": [{"name": "t", "var_id": "t"}], "outputs": [{"name": "o", "var_id": "o"}], **extra}
            return http.post(f"/api/v1/sessions/{sid}/calls", json=body)
        def cycle():
            for var in ("p", "q"):
                http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": var}).raise_for_status()
            first = {"call_id": "a", "function": "a", "template": "{{input:p}} {{output:q}}",
                     "inputs": [{"name": "p", "var_id": "p"}], "outputs": [{"name": "q", "var_id": "q"}]}
            http.post(f"/api/v1/sessions/{sid}/calls", json=first).raise_for_status()
            return http.post(f"/api/v1/sessions/{sid}/calls", json={**first, "call_id": "b", "function": "b",
                             "inputs": [{"name": "q", "var_id": "q"}], "outputs": [{"name": "p", "var_id": "p"}],
                             "template": "{{input:q}} {{output:p}}"})
        cases = {
            "malformed json": (http.post(f"/api/v1/sessions/{sid}/calls", content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid"),
            "wrong type": (http.post(f"/api/v1/sessions/{sid}/variables", json={"var_id": 5}), 400, "var_id"),
            "unknown variable": (http.get(f"/api/v1/sessions/{sid}/variables/nope"), 404, "nope"),
            "template kind": (call("Do {{inptu:t}} {{output:o}}"), 400, "unknown placeholder kind"),
            "unbalanced": (call("Do {{input:t} {{output:o}}"), 400, "unbalanced"),
            "top_p": (call("Do {{input:t}}: {{output:o}}", outputs=[{"name": "o", "var_id": "o", "sampling": {"top_p": 2}}]), 400, "top_p"),
            "max_tokens": (call("Do {{input:t}}: {{output:o}}", outputs=[{"name": "o", "var_id": "o", "sampling": {"max_tokens": -1}}]), 400, "max_tokens"),
            "too big": (http.post(f"/api/v1/sessions/{sid}/variables", content=b"x" * (9 * 2**20), headers={"content-type": "application/json"}), 413, "limit"),
            "too big, chunked": (http.post(f"/api/v1/sessions/{sid}/variables", content=(b"x" * 2**20 for _ in range(9)),
                                           headers={"content-type": "application/json"}), 413, "limit"),
            "bad utf-8": (http.post(f"/api/v1/sessions/{sid}/variables", content=b'{"var_id": "u", "value": "\xff\xfe"}', headers={"content-type": "application/json"}), 400, "utf-8"),
            "unknown model": (http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "gpt-9"),
            "temperature": (http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "temperature": -1}), 400, "temperature"),
            "cycle": (cycle(), 400, "cycle"),
            "too long": (http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 9000, "max_tokens": 1}), 400, "tokens"),
            # refused before a stream starts: a 400, not a 200 whose stream then carries an error
            "too long, streamed": (http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 9000, "stream": True}),
                                   400, "shorten the prompt"),
            "past the context": (http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1000,
                                                                         "messages": [{"role": "user", "content": "word " * 7500}]}),
                                 400, "lower max_tokens to"),
            "choices, streamed": (http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 40, "stream": True}),
                                  400, "at most 64 choices"),
            "schema not an object": (http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "response_format": {
                "type": "json_schema", "json_schema": ["x"]}}), 400, "give its schema"),
            "choice not a list": (http.post("/v1/completions", json={"model": MODEL, "prompt": "a",
                                                                     "structured_outputs": {"choice": 5}}), 400, "list of strings"),
            "empty in a list": (http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", ""]}), 400, "empty"),
            "form body": (http.post("/v1/completions", content=b'{"model": "x", "prompt": "a"}',
                                    headers={"content-type": "application/x-www-form-urlencoded"}), 415, "content-type: application/json"),
            "stream_options alone": (http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}),
                                     400, "only taken with stream: true"),
            "no allowed tokens": (http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "allowed_token_ids": []}), 400, "is empty"),
            "an image": (http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
                         400, "parts of type image_url"),
            "engine model": (http.post("/api/v1/engines/register", headers={"authorization": f"Bearer {ENGINE_KEY}"},
                                       json={"name": "rogue", "url": "http://127.0.0.1:1", "model": "llama-70b"}), 400, "llama-70b"),
        }
        for name, (response, status, needle) in cases.items():
            assert response.status_code == status, (name, response.text)
            assert needle.lower() in response.json()["error"]["message"].lower(), (name, response.text)
        assert httpx.get(f"{server}/health").json()["status"] == "ok"
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                                                "stream": None})  # null, as some clients send it: not streamed
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["text"]
        metrics = http.get("/metrics").text
        assert "parrot_call_seconds" in metrics and "parrot_engine_kv_blocks_total" in metrics


def test_openai_compatible_server_as_engine_backend(server):
    """Our own OpenAI endpoint stands in for vLLM/SGLang/llama.cpp: contexts kept as text. Its
    stream's last event, which only says why the answer ended, is no token (usage would count
    one too many); a server nobody answers at is an engine gone, not an internal error."""
    from parrot.engine.llm_engine import FinishReason
    from parrot.errors import EngineUnavailableError

    async def pieces(url: str) -> list:
        remote = OpenAICompatibleBackend("oa-count", url, MODEL, api_key=KEYS["bob"])
        try:
            await remote.fill("c", None, "The capital of France is", 0)
            return [t async for t in remote.generate("c", SamplingParams(max_tokens=6, ignore_eos=True), 0)]
        finally:
            await remote.close()

    counted = asyncio.run(pieces(server))
    assert len(counted) == 6 and counted[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(EngineUnavailableError, match="oa-count"):
        asyncio.run(pieces("http://127.0.0.1:9"))
    backend = OpenAICompatibleBackend("oa-0", server, MODEL, api_key=KEYS["bob"])
    with P.Runtime(backends=[backend]) as runtime:
        answer = write_code("a calculator").get()
        assert runtime.dag().calls[0].engine == "oa-0"
    direct = httpx.post(
        f"{server}/v1/completions", headers=auth("bob"), timeout=60,
        json={"model": MODEL, "prompt": "You are an expert software engineer.\nWrite python code of a calculator.\nCode: ", "max_tokens": 12, "temperature": 0},
    ).json()["choices"][0]["text"]
    assert answer == direct


def test_engine_started_separately_registers_and_serves():
    proc, url = start_server(["--engines", "0"])
    engine = None
    try:
        wait_for_engines(url, 0, proc)
        engine = subprocess.Popen(
            [sys.executable, "-m", "parrot.cli", "engine", "--manager", url, "--model", MODEL, "--name", "remote-1", "--kv-memory-gb", "0.25"],
            env={**os.environ, "PARROT_ENGINE_KEY": ENGINE_KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_engines(url, 1, proc)
        # its stats come with its registration, not 2 s later with its first heartbeat: the calls
        # placed at once are weighed by its KV capacity and step budget
        assert engine_gauges(url)["parrot_engine_kv_blocks_total"] > 0
        assert httpx.get(f"{url}/health").json()["engines"] == ["remote-1"]
        with P.connect(url, api_key=KEYS["alice"]) as remote:
            code = write_code("a calculator").get()
            assert code.strip() and remote.dag().calls[0].engine == "remote-1"
    finally:
        if engine is not None:
            stop(engine)
        stop(proc)


def engine_gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def assert_engine_goes_idle(url: str, failure: str, within_s: float = 20) -> None:
    """No job runs and no context is held on the engines within a while (they report every 2 s)."""
    time.sleep(2.5)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        gauges = engine_gauges(url)
        if gauges["parrot_engine_running_jobs"] == gauges["parrot_engine_contexts"] == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{failure}: {gauges}")


def test_a_dropped_stream_stops_its_generation(server):
    """A client that hangs up mid-stream frees the engine: its session closes and its call stops."""
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", headers=auth("alice"), json=body, timeout=60) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    # 2000 tokens take a minute here
    assert_engine_goes_idle(server, "the dropped stream's call still runs")


def test_a_list_of_prompts_gets_one_choice_each_in_order(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS["alice"], timeout=120)
    prompts = ["The capital of France is", "One, two, three,"]
    both = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    # each choice answers its own prompt (not the two joined into one): only the first names Paris
    assert "Paris" in both.choices[0].text and "Paris" not in both.choices[1].text
    assert all(c.text.strip() for c in both.choices)
    assert both.usage.completion_tokens == 8


def test_a_client_that_hangs_up_before_its_answer_stops_its_generation(server):
    """Not streamed: the server notices the closed connection while it waits, and stops the call."""
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", headers=auth("alice"), json=body, timeout=httpx.Timeout(60, read=3))
    assert_engine_goes_idle(server, "the abandoned request's call still runs")


def test_a_second_engine_under_a_live_engines_name_is_refused(server):
    """It would take the live engine's place while the live one heartbeats for it: every call
    would go to the newcomer, and none anywhere once it died."""
    body = {"name": "engine-0", "url": "http://127.0.0.1:1", "model": MODEL}
    refused = httpx.post(f"{server}/api/v1/engines/register", headers={"authorization": f"Bearer {ENGINE_KEY}"}, json=body, timeout=10)
    assert refused.status_code == 409 and "give this engine another --name" in refused.json()["error"]["message"]
    ok = httpx.post(f"{server}/v1/completions", headers=auth("alice"), timeout=60,
                    json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200


def test_an_engine_whose_key_the_manager_refuses_stops_with_a_message(server):
    """Trying again would never succeed: it exits (code 2) and says which key to give."""
    engine = subprocess.run([sys.executable, "-m", "parrot.cli", "engine", "--manager", server, "--engine-key", "not-the-key",
                             "--kv-memory-gb", "0.05"], capture_output=True, text=True, timeout=180)
    assert engine.returncode == 2, engine.stderr[-2000:]
    assert "refused this engine's key" in engine.stderr and "PARROT_ENGINE_KEY" in engine.stderr


def test_a_fill_past_what_an_engine_takes_is_the_callers_error():
    """A template around an input near its limit: a 400 that says to shorten the inputs, not a 500
    from the engine wire's own limit."""
    from parrot.backends.http_engine import HttpEngineBackend
    from parrot.errors import PromptTooLongError
    from parrot.protocol.manager_api import MAX_VALUE_CHARS

    backend = HttpEngineBackend("e", "http://127.0.0.1:9", MODEL, ENGINE_KEY)
    with pytest.raises(PromptTooLongError, match="shorten the inputs"):
        asyncio.run(backend.fill("c", None, "x" * (MAX_VALUE_CHARS + 1), 0))
