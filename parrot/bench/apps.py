"""The benchmark apps, written twice over the same prompts: as a Parrot program
(semantic functions, one get at the end) and as a request-level orchestrating
client (LangChain-style: it waits for each answer and sends the next request)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import parrot as P

SUMMARIZE = "Write a one-sentence summary of this passage.\nPassage: {{input:chunk}}\nSummary:{{output:summary}}"
REFINE = (
    "Here is a summary of a text so far: {{input:previous}}\n"
    "Refine the summary with the next passage.\nPassage: {{input:chunk}}\nRefined summary:{{output:summary}}"
)


def reduce_template(parts: int) -> str:
    listed = "\n".join(f"- {{{{input:part{i}}}}}" for i in range(parts))
    return f"Combine these summaries into one.\n{listed}\nCombined summary:{{{{output:summary}}}}"


def render(template: str, values: dict[str, str]) -> str:
    """The prompt text a request-level client sends: the template up to its output."""
    prompt = template[: template.index("{{output:")]
    for name, value in values.items():
        prompt = prompt.replace(f"{{{{input:{name}}}}}", value)
    return prompt


@dataclass(frozen=True)
class AppShape:
    output_tokens: int


def semantic(name: str, template: str, inputs: list[str], output_tokens: int) -> P.frontend.function.SemanticFunction:
    """A semantic function built from a template string (the benchmark makes them at run time)."""
    def body(**_):
        return None

    params = [inspect.Parameter(i, inspect.Parameter.KEYWORD_ONLY, annotation=P.Input) for i in inputs]
    params.append(inspect.Parameter("summary", inspect.Parameter.KEYWORD_ONLY,
                                    annotation=P.Output(max_tokens=output_tokens, ignore_eos=True)))
    body.__signature__ = inspect.Signature(params)
    body.__doc__ = template
    body.__name__ = name
    return P.semantic_function()(body)


# ---- Parrot programs -------------------------------------------------------

def parrot_chain(chunks: list[str], output_tokens: int) -> P.SemanticVariable:
    first = semantic("summarize", SUMMARIZE, ["chunk"], output_tokens)
    refine = semantic("refine", REFINE, ["previous", "chunk"], output_tokens)
    summary = first(chunk=chunks[0])
    for chunk in chunks[1:]:
        summary = refine(previous=summary, chunk=chunk)
    return summary


def parrot_map_reduce(chunks: list[str], output_tokens: int) -> P.SemanticVariable:
    mapper = semantic("summarize", SUMMARIZE, ["chunk"], output_tokens)
    reducer = semantic("combine", reduce_template(len(chunks)), [f"part{i}" for i in range(len(chunks))], output_tokens)
    parts = [mapper(chunk=chunk) for chunk in chunks]
    return reducer(**{f"part{i}": part for i, part in enumerate(parts)})


# ---- request-level clients ---------------------------------------------------

Complete = Callable[[str, int], str]  # (prompt, max_tokens) -> completion text


def request_chain(complete: Complete, chunks: list[str], output_tokens: int) -> str:
    summary = complete(render(SUMMARIZE, {"chunk": chunks[0]}), output_tokens)
    for chunk in chunks[1:]:
        summary = complete(render(REFINE, {"previous": summary, "chunk": chunk}), output_tokens)
    return summary


def request_map_reduce(complete: Complete, chunks: list[str], output_tokens: int) -> str:
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        parts = list(pool.map(lambda c: complete(render(SUMMARIZE, {"chunk": c}), output_tokens), chunks))
    values = {f"part{i}": part for i, part in enumerate(parts)}
    return complete(render(reduce_template(len(chunks)), values), output_tokens)
