"""Structured output: what the engine generates under a JSON schema, a regex or a choice matches
it, greedy or sampled, and ends when the grammar is complete."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from parrot.engine.llm_engine import FinishReason
from parrot.engine.sampler import SamplingParams
from parrot.engine.structured import StructuredOutput, StructureKind
from parrot.errors import SamplingError

from conftest import fill_and_generate, finish_of, greedy, run, text_of

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def generate(engine, prompt: str, sampling: SamplingParams, tag: str):
    return run(fill_and_generate(engine, tag, engine.tokenizer.encode(prompt), sampling))


@pytest.mark.parametrize("sampling", [greedy(60, ignore_eos=False), SamplingParams(max_tokens=60, temperature=1.0, seed=5)])
def test_json_schema_output_parses_and_holds_the_schemas_fields(engine, sampling):
    structured = StructuredOutput(StructureKind.JSON_SCHEMA, json.dumps(PERSON))
    tokens = generate(engine, "Describe a person as JSON: ", replace(sampling, structured=structured), "json")
    person = json.loads(text_of(tokens))
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)
    assert finish_of(tokens) is FinishReason.STOP


def test_regex_and_choice_outputs_match_and_end_with_the_grammar(engine):
    phone = generate(engine, "Call me at ", greedy(30, structured=StructuredOutput(StructureKind.REGEX, r"\(\d{3}\) \d{3}-\d{4}")), "regex")
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", text_of(phone)) and finish_of(phone) is FinishReason.STOP
    options = ["yes", "no", "it depends"]
    for seed in range(4):
        sampling = SamplingParams(max_tokens=20, temperature=1.5, seed=seed, ignore_eos=True, structured=StructuredOutput.choice(options))
        tokens = generate(engine, "Is the sky green? Answer: ", sampling, f"choice-{seed}")
        assert text_of(tokens) in options and finish_of(tokens) is FinishReason.STOP  # even with ignore_eos


def test_a_json_object_ends_when_it_closes_and_resumes_after_text_it_already_holds(engine):
    tokens = generate(engine, "A JSON object: ", greedy(40, structured=StructuredOutput.json_object()), "object")
    assert isinstance(json.loads(text_of(tokens)), dict) and len(tokens) < 40
    # a call run again after its engine failed: the grammar takes in what the output already holds
    held = '{"name": "Ada", "age": '
    resumed = StructuredOutput(StructureKind.JSON_SCHEMA, json.dumps(PERSON), resume_text=held)
    rest = generate(engine, "Describe a person as JSON: " + held, greedy(20, structured=resumed), "resumed")
    assert json.loads(held + text_of(rest))["name"] == "Ada"


def test_a_grammar_in_gbnf_is_taken_as_vllm_takes_it(engine):
    gbnf = 'root ::= answer " (" digit ")"\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    tokens = generate(engine, "Is water wet? Answer: ", greedy(12, structured=StructuredOutput(StructureKind.LARK, gbnf)), "gbnf")
    assert re.fullmatch(r"(yes|no) \(\d\)", text_of(tokens)) and finish_of(tokens) is FinishReason.STOP
    with pytest.raises(SamplingError, match="neither Lark .with a start rule. nor GBNF"):
        generate(engine, "x", greedy(4, structured=StructuredOutput(StructureKind.LARK, "root ::= (")), "bad-gbnf")


def test_specs_that_do_not_compile_are_refused_with_the_grammar_engines_message(engine):
    with pytest.raises(SamplingError, match="(?s)regex for structured output does not compile: .*unclosed group"):
        generate(engine, "x", greedy(4, structured=StructuredOutput(StructureKind.REGEX, "a(b")), "bad-regex")
    with pytest.raises(SamplingError, match="json_schema for structured output does not compile"):
        generate(engine, "x", greedy(4, structured=StructuredOutput(StructureKind.JSON_SCHEMA, '{"type": "foo"}')), "bad-schema")
    with pytest.raises(SamplingError, match="must not be empty"):
        StructuredOutput(StructureKind.LARK, " ")
