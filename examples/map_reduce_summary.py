"""Map-reduce summarization: summarize every chunk in parallel (map), then combine
the chunk summaries into one (reduce).

The program asks only for the final summary, for latency. The server deduces the
rest from the DAG: the map calls all feed one consumer, so they form a task group
whose completion is what matters; they are scheduled as throughput work, batched
together on one engine, while the reduce stays latency-critical.

Document: the docstring of Python's `json` module (offline, deterministic).
"""

import json
import time

import parrot as P

NUM_CHUNKS = 4


@P.semantic_function()
def summarize_chunk(chunk: P.Input, summary: P.Output(max_tokens=40)):
    """<|im_start|>user
    Summarize this part of the documentation in one sentence.
    {{chunk}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def combine(s1: P.Input, s2: P.Input, s3: P.Input, s4: P.Input, summary: P.Output(max_tokens=48)):
    """<|im_start|>user
    These are summaries of four parts of one documentation page:
    1. {{s1}}
    2. {{s2}}
    3. {{s3}}
    4. {{s4}}
    Write one short summary of the whole page.<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


def split_evenly(text: str, parts: int) -> list[str]:
    words = text.split()
    size = -(-len(words) // parts)
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def map_reduce_summary(chunks: list[str]) -> tuple[list[P.SemanticVariable], P.SemanticVariable]:
    maps = [summarize_chunk(P.variable(f"chunk_{i}", chunk)) for i, chunk in enumerate(chunks)]
    return maps, combine(*maps)


if __name__ == "__main__":
    chunks = split_evenly(json.__doc__, NUM_CHUNKS)
    assert len(chunks) == NUM_CHUNKS
    with P.Runtime(model="smollm2-135m") as runtime:
        maps, final = map_reduce_summary(chunks)
        started = time.perf_counter()
        text = final.get(perf=P.LATENCY)
        elapsed = time.perf_counter() - started
        for i, summary in enumerate(maps):
            print(f"=== map {i}: chunk {i} of the json module's documentation ===")
            print(summary.get().strip())
        print("=== reduce: the whole page ===")
        print(text.strip())
        print(f"=== {NUM_CHUNKS} map calls and 1 reduce in {elapsed:.1f}s; the DAG: ===")
        print(P.format_dag(runtime.dag()))
