"""Chain summarization: summarize the first chunk, then refine the running summary
with each next chunk.

Every step consumes the previous step's output. The program submits the whole chain
at once and asks for the final summary a single time: each refinement starts inside
the server the moment its predecessor finishes, with no client round trip between
steps (compare the client calls printed at the end with the number of steps).

Document: the docstring of Python's `csv` module (offline, deterministic).
"""

import csv
import time

import parrot as P

WORDS_PER_CHUNK = 95


@P.semantic_function()
def summarize(chunk: P.Input, summary: P.Output(max_tokens=40)):
    """<|im_start|>user
    Summarize this documentation in two sentences.
    {{chunk}}<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


@P.semantic_function()
def refine(previous: P.Input, chunk: P.Input, summary: P.Output(max_tokens=40)):
    """<|im_start|>user
    Documentation:
    {{chunk}}
    Summary of the documentation before it:
    {{previous}}
    Write a new two-sentence summary that covers both.<|im_end|>
    <|im_start|>assistant
    {{summary}}"""


def chunks_of(text: str, words_per_chunk: int) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


def chain_summary(chunks: list[str]) -> list[P.SemanticVariable]:
    """Submits the chain; returns the running summary after each step."""
    summaries = [summarize(P.variable("chunk_0", chunks[0]))]
    for i, chunk in enumerate(chunks[1:], 1):
        summaries.append(refine(summaries[-1], P.variable(f"chunk_{i}", chunk)))
    return summaries


if __name__ == "__main__":
    chunks = chunks_of(csv.__doc__, WORDS_PER_CHUNK)
    with P.Runtime(model="smollm2-135m") as runtime:
        summaries = chain_summary(chunks)
        calls_before = runtime.client_calls
        started = time.perf_counter()
        summaries[-1].get(perf=P.LATENCY)  # one request for the whole chain
        elapsed = time.perf_counter() - started
        client_calls = runtime.client_calls - calls_before
        for i, summary in enumerate(summaries):
            print(f"=== summary after chunk {i + 1} of {len(chunks)} (the csv module's documentation) ===")
            print(summary.get().strip())
        print(f"=== {len(chunks)} dependent calls in {elapsed:.1f}s with {client_calls} client call; the DAG: ===")
        print(P.format_dag(runtime.dag()))
