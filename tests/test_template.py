"""Prompt templates: every error, at decoration time and at the server, and parser properties.

The same rules hold in two places: `@P.semantic_function()` checks the docstring when
the function is defined, and `Manager.submit_call` checks a CallSpec again, because a
client can be anything (the HTTP API takes raw templates and bindings).
"""

from __future__ import annotations

import keyword
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import parrot as P
from parrot.backends.simulated import SimulatedEngineBackend
from parrot.engine.sampler import SamplingParams
from parrot.errors import UserError
from parrot.frontend.template import (
    MAX_PLACEHOLDERS,
    MAX_TEMPLATE_CHARS,
    Placeholder,
    PlaceholderKind,
    TemplateError,
    TextSegment,
    check_placeholders,
    parse_template,
)
from parrot.manager.manager import Manager
from parrot.manager.spec import CallSpec, InputBinding, OutputBinding

INPUT, OUTPUT = PlaceholderKind.INPUT, PlaceholderKind.OUTPUT


# ---- helpers -----------------------------------------------------------------


class Server:
    """A manager with one simulated engine and one session; submit() is what a remote client does."""

    def __init__(self) -> None:
        self.manager = Manager([SimulatedEngineBackend()])
        self.session = self.manager.create_session()
        self._next = 0

    def var(self, value: str | None = None) -> str:
        self._next += 1
        var_id = f"v{self._next}"
        self.manager.create_variable(self.session, var_id, var_id, value)
        return var_id

    def submit(self, template: str, inputs: list[str], outputs: list[str], function: str = "f") -> None:
        spec = CallSpec(
            function,
            template,
            tuple(InputBinding(name, self.var("text")) for name in inputs),
            tuple(OutputBinding(name, self.var(), SamplingParams(max_tokens=2)) for name in outputs),
        )
        self._next += 1
        self.manager.submit_call(self.session, f"c{self._next}", spec)

    @property
    def graph(self):
        return self.manager.sessions[self.session].graph


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def sim_runtime():
    with P.Runtime(backends=[SimulatedEngineBackend()]) as runtime:
        yield runtime


def kinds_of(segments) -> dict[str, PlaceholderKind]:
    return {s.name: s.kind for s in segments if isinstance(s, Placeholder)}


# ---- every error: (template, inputs, outputs, message regex) ------------------
# inputs/outputs are the parameter names: annotations P.Input / P.Output at decoration
# time, bindings at the server. Each case is checked in both places.

ERRORS = {
    "unknown kind": (
        "Summarize {{inptu:doc}}. Summary: {{output:summary}}",
        ["doc"], ["summary"],
        r"unknown placeholder kind 'inptu' \(use input or output, e.g. \{\{input:doc\}\}\)",
    ),
    "closing braces with no opening": (
        "Summarize }} {{input:doc}}. Summary: {{output:summary}}",
        ["doc"], ["summary"],
        r"unbalanced braces: '\}\}' with no '\{\{' before it",
    ),
    "opening braces never closed": (
        "Summarize {{input:doc}}. Summary: {{output:summary",
        ["doc"], ["summary"],
        r"unbalanced braces: '\{\{' is never closed with '\}\}'",
    ),
    "opening braces closed only after another opening": (
        "Summarize {{input:doc. Summary: {{output:summary}}",
        ["doc"], ["summary"],
        r"unbalanced braces: '\{\{' is never closed with '\}\}'",
    ),
    "placeholder with no parameter": (
        "Summarize {{input:doc}} in {{input:language}}. Summary: {{output:summary}}",
        ["doc"], ["summary"],
        r"placeholder 'language' has no parameter of that name in f's signature",
    ),
    "parameter never used": (
        "Summarize {{input:doc}}. Summary: {{output:summary}}",
        ["doc", "style"], ["summary"],
        r"parameter\(s\) 'style' of f never appear in its template",
    ),
    "output used twice": (
        "Summarize {{input:doc}}. Summary: {{output:summary}}. Again: {{output:summary}}",
        ["doc"], ["summary"],
        r"output 'summary' is used twice; each output is generated once",
    ),
    "two outputs with no text between them": (
        "Summarize {{input:doc}}. Summary: {{output:summary}}{{output:title}}",
        ["doc"], ["summary", "title"],
        r"outputs 'summary' and 'title' have no text between them",
    ),
    "two outputs with only whitespace between them": (
        "Summarize {{input:doc}}. Summary: {{output:summary}} \n\t {{output:title}}",
        ["doc"], ["summary", "title"],
        r"outputs 'summary' and 'title' have no text between them",
    ),
    "output first": (
        "{{output:summary}} is the summary of {{input:doc}}",
        ["doc"], ["summary"],
        r"output 'summary' comes first; put the prompt \(text or an input\) before it",
    ),
    "output first after whitespace": (
        "  \n {{output:summary}} is the summary of {{input:doc}}",
        ["doc"], ["summary"],
        r"output 'summary' comes first",
    ),
    "no output": (
        "Summarize {{input:doc}}.",
        ["doc"], [],
        r"the template of f has no output placeholder; add one such as \{\{output:answer\}\}",
    ),
    "placeholder name not an identifier": (
        "Summarize {{input:1doc}}. Summary: {{output:summary}}",
        ["doc"], ["summary"],
        r"placeholder \{\{input:1doc\}\} needs a Python identifier as its name",
    ),
    "empty placeholder": (
        "Summarize {{}}. Summary: {{output:summary}}",
        [], ["summary"],
        r"placeholder \{\{\}\} needs a Python identifier as its name",
    ),
    "input used as output": (
        "Summarize {{input:doc}}. Summary: {{output:doc}}",
        ["doc"], [],
        r"'doc' is annotated input but used as output",
    ),
    "output used as input": (
        "Summarize {{input:doc}}. Summary: {{output:summary}} {{input:summary}}",
        ["doc"], ["summary"],
        r"'summary' is annotated output but used as input",
    ),
}

UNLOCATED = {"parameter never used", "no output"}  # errors about the whole template, not one place


def _make_function(template: str, inputs: list[str], outputs: list[str], name: str = "f"):
    """Defines `def f(<inputs>: P.Input, <outputs>: P.Output(max_tokens=4))` with the template as docstring."""
    namespace = {"P": P}
    params = [f"{n}: P.Input" for n in inputs] + [f"{n}: P.Output(max_tokens=4)" for n in outputs]
    source = f"def {name}({', '.join(params)}):\n    pass\n"
    exec(source, namespace)  # noqa: S102 - test code building functions with arbitrary signatures
    fn = namespace[name]
    fn.__doc__ = template
    return P.semantic_function()(fn)


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_error_at_decoration_time(case: str) -> None:
    template, inputs, outputs, message = ERRORS[case]
    with pytest.raises(TemplateError, match=message) as info:
        _make_function(template, inputs, outputs)
    assert isinstance(info.value, UserError)
    if case not in UNLOCATED:
        assert re.search(r"in the template of f, line \d+:\n    .*\n *\^$", str(info.value))


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_error_at_the_server(case: str, server: Server) -> None:
    template, inputs, outputs, message = ERRORS[case]
    # the server knows parameters only through bindings: an input bound as input and
    # used as {{output:x}} reads "annotated input but used as output" there too
    with pytest.raises(TemplateError, match=message):
        server.submit(template, inputs, outputs)
    assert server.graph.calls == {}, "a rejected call must leave the graph unchanged"
    assert all(not v.consumers and v.producer is None for v in server.graph.variables.values())


def test_error_message_points_at_the_place(server: Server) -> None:
    template = "You are a careful editor.\nSummarize {{inptu:doc}} now.\nSummary: {{output:summary}}"
    with pytest.raises(TemplateError) as info:
        _make_function(template, ["doc"], ["summary"], name="summarize")
    lines = str(info.value).splitlines()
    assert lines[0].endswith("in the template of summarize, line 2:")
    assert lines[1] == "    Summarize {{inptu:doc}} now."
    assert lines[2] == "    " + " " * len("Summarize ") + "^"
    with pytest.raises(TemplateError) as at_server:
        server.submit(template, ["doc"], ["summary"], function="summarize")
    assert str(at_server.value) == str(info.value)


def test_input_then_output_of_the_same_unannotated_parameter_is_rejected() -> None:
    # the poster's spelling: the template alone says the kind
    with pytest.raises(TemplateError, match=r"'doc' is an input and cannot also be an output"):

        @P.semantic_function()
        def f(doc, title):
            """Summarize {{input:doc}}. Summary: {{output:doc}} Title: {{output:title}}"""

    with pytest.raises(TemplateError, match=r"'doc' is an output and cannot also be an input"):

        @P.semantic_function()
        def g(doc):
            """Write a story. Story: {{output:doc}} Again {{input:doc}}"""


def test_plain_placeholder_needs_a_kind() -> None:
    with pytest.raises(TemplateError, match=r"placeholder \{\{doc\}\} has no kind: write \{\{input:doc\}\} or annotate"):

        @P.semantic_function()
        def f(doc, summary: P.Output):
            """Summarize {{doc}}. Summary: {{summary}}"""


def test_missing_docstring() -> None:
    with pytest.raises(UserError, match="semantic function f needs a docstring: it is the prompt template"):

        @P.semantic_function()
        def f(doc: P.Input, summary: P.Output):
            pass


def test_annotations_may_name_the_defining_functions_locals() -> None:
    # annotations are text here (from __future__ import annotations): read where the function is defined
    short = P.Output(max_tokens=3, logit_bias={7: 2.0})

    @P.semantic_function()
    def reply(question: P.Input, answer: short):
        """Q: {{input:question}} A: {{output:answer}}"""

    assert reply.output_settings["answer"].sampling() == SamplingParams(max_tokens=3, logit_bias={7: 2.0})
    with pytest.raises(UserError, match="an annotation names something not defined where the function is: name 'nowhere'"):
        @P.semantic_function()
        def lost(answer: nowhere):  # noqa: F821
            """A: {{output:answer}}"""


def test_template_size_limits() -> None:
    too_long = "x" * (MAX_TEMPLATE_CHARS + 1) + "{{output:y}}"
    with pytest.raises(TemplateError, match=f"has {len(too_long)} characters; the limit is {MAX_TEMPLATE_CHARS}"):
        parse_template(too_long, "f")
    many = " ".join("{{input:x}}" for _ in range(MAX_PLACEHOLDERS + 1))
    with pytest.raises(TemplateError, match=f"has more than {MAX_PLACEHOLDERS} placeholders"):
        parse_template(many, "f")
    # exactly at the limit is fine
    assert len(parse_template(" ".join("{{input:x}}" for _ in range(MAX_PLACEHOLDERS)), "f")) == 2 * MAX_PLACEHOLDERS - 1


def test_server_rejects_a_parameter_bound_twice(server: Server) -> None:
    spec = CallSpec(
        "f",
        "Q {{input:a}} A {{output:b}}",
        (InputBinding("a", server.var("x")), InputBinding("a", server.var("y"))),
        (OutputBinding("b", server.var()),),
    )
    with pytest.raises(UserError, match="each parameter is bound once, as an input or as an output"):
        server.manager.submit_call(server.session, "c", spec)
    spec = CallSpec("f", "Q {{input:a}} A {{output:a}}", (InputBinding("a", server.var("x")),), (OutputBinding("a", server.var()),))
    with pytest.raises(UserError, match="each parameter is bound once"):
        server.manager.submit_call(server.session, "c", spec)
    assert server.graph.calls == {}


# ---- both spellings ----------------------------------------------------------


class RecordingBackend(SimulatedEngineBackend):
    """Records every text filled into a context."""

    def __init__(self) -> None:
        super().__init__()
        self.fills: list[str] = []

    async def fill(self, context_id, parent_context_id, text, priority, shared_prefix_chars=0, then_generate=False):
        self.fills.append(text)
        await super().fill(context_id, parent_context_id, text, priority, shared_prefix_chars, then_generate)


@P.semantic_function()
def poster_spelling(task: P.SemanticVariable, code: P.Output(max_tokens=3)):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@P.semantic_function()
def annotated_spelling(task: P.Input, code: P.Output(max_tokens=3)):
    """You are an expert software engineer.
    Write python code of {{task}}.
    Code: {{code}}"""


@P.semantic_function()
def both_spellings(task: P.Input, code: P.Output(max_tokens=3)):
    """You are an expert software engineer.
    Write python code of {{ input : task }}.
    Code: {{code}}"""


@P.semantic_function()
def unannotated_poster_spelling(task, code):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


def test_both_spellings_parse_to_the_same_call() -> None:
    for fn in (poster_spelling, annotated_spelling, both_spellings, unannotated_poster_spelling):
        assert fn.kinds == {"task": INPUT, "code": OUTPUT}, fn.name
        assert fn.output_order == ["code"]
    assert poster_spelling.output_settings["code"].max_tokens == 3
    assert unannotated_poster_spelling.output_settings["code"] == P.Output()  # the default settings


def test_both_spellings_send_the_same_prompt() -> None:
    backend = RecordingBackend()
    with P.Runtime(backends=[backend]) as runtime:
        task = P.variable("task", "a snake game")
        results = [fn(task).get() for fn in (poster_spelling, annotated_spelling, both_spellings)]
        assert runtime.dag().calls[0].inputs == {"task": task.var_id}
    prompt = "You are an expert software engineer.\nWrite python code of a snake game.\nCode: "
    assert backend.fills == [prompt, prompt, prompt]
    assert len(set(results)) == 1 and len(results[0].split()) == 3


def test_server_accepts_plain_placeholders_typed_by_bindings(server: Server) -> None:
    server.submit("Write python code of {{task}}.\nCode: {{code}}", ["task"], ["code"])
    (call,) = server.graph.calls.values()
    assert [type(s) for s in call.segments] == [TextSegment, Placeholder, TextSegment, Placeholder]
    assert kinds_of(call.segments) == {"task": INPUT, "code": OUTPUT}


def test_annotation_and_placeholder_kinds_must_agree() -> None:
    with pytest.raises(TemplateError, match="'task' is annotated output but used as input"):

        @P.semantic_function()
        def f(task: P.Output, code: P.Output):
            """Write python code of {{input:task}}. Code: {{output:code}}"""


def test_a_template_may_read_an_input_twice_and_have_several_outputs(server: Server) -> None:
    @P.semantic_function()
    def f(task: P.Input, code: P.Output(max_tokens=2), test: P.Output(max_tokens=3)):
        """Task: {{task}}. Code: {{code}}. Tests for {{task}}: {{test}}. End."""

    assert f.output_order == ["code", "test"]
    assert [f.output_settings[n].max_tokens for n in f.output_order] == [2, 3]
    server.submit("Task: {{task}}. Code: {{code}}. Tests for {{task}}: {{test}}. End.", ["task"], ["code", "test"])


def test_literal_double_braces_are_refused_with_the_way_to_send_them() -> None:
    with pytest.raises(TemplateError, match="gets that text through an input"):
        @P.semantic_function()
        def as_json(task: P.Input, answer: P.Output(max_tokens=4)):
            """Answer {{task}} as {{"answer": "..."}}: {{answer}}"""

    @P.semantic_function()
    def as_json_by_input(task: P.Input, shape: P.Input, answer: P.Output(max_tokens=4)):
        """Answer {{task}} as {{shape}}: {{answer}}"""

    with P.Runtime(backends=[SimulatedEngineBackend("sim-0")]):
        answer = as_json_by_input(task=P.variable("task", "2+2"), shape=P.variable("shape", '{{"answer": "..."}}'))
        assert answer.get().strip()


# ---- parser properties -----------------------------------------------------

NO_BRACES = st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=200)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))
SPACES = st.sampled_from(["", " ", "  ", "\t", "\n"])


@settings(deadline=None)  # the machine is shared; timing is not what these check
@given(NO_BRACES)
def test_text_without_braces_is_one_text_segment(text: str) -> None:
    assert parse_template(text) == ([TextSegment(text)] if text else [])


@settings(deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.text(st.sampled_from("ab {}:\n"), max_size=60))
def test_single_braces_are_plain_text(text: str) -> None:
    assume("{{" not in text and "}}" not in text)
    assert parse_template(text) == ([TextSegment(text)] if text else [])


@st.composite
def well_formed_templates(draw):
    """(template, expected segments): texts without braces alternating with placeholders."""
    parts = draw(st.lists(st.one_of(st.tuples(st.just("text"), NO_BRACES.filter(bool)), st.tuples(st.just("ph"), NAMES)), max_size=12))
    template, expected = "", []
    for part_kind, value in parts:
        if part_kind == "text":
            if expected and isinstance(expected[-1], TextSegment):  # adjacent texts are one segment
                expected[-1] = TextSegment(expected[-1].text + value)
            else:
                expected.append(TextSegment(value))
            template += value
            continue
        kind = draw(st.sampled_from([None, INPUT, OUTPUT]))
        before, after, around_colon = draw(SPACES), draw(SPACES), draw(SPACES)
        body = value if kind is None else f"{kind.value}{around_colon}:{around_colon}{value}"
        expected.append(Placeholder(value, kind, len(template)))
        template += "{{" + before + body + after + "}}"
    return template, expected


@settings(deadline=None)  # the machine is shared; timing is not what these check
@given(well_formed_templates())
def test_well_formed_templates_parse_into_their_segments(case) -> None:
    template, expected = case
    assert parse_template(template) == expected


@st.composite
def valid_semantic_templates(draw):
    """(template, inputs, outputs) that satisfy every rule: check_placeholders and the server accept them."""
    names = draw(st.lists(NAMES, min_size=1, max_size=8, unique=True))
    outputs = names[: draw(st.integers(1, len(names)))]
    inputs = names[len(outputs):]
    order = draw(st.permutations(inputs + outputs + [n for n in inputs if draw(st.booleans())]))
    template = draw(NO_BRACES.filter(str.strip))  # something before the first output
    for name in order:
        spelling = draw(st.sampled_from(["plain", "typed"]))
        kind = "output" if name in outputs else "input"
        template += ("{{" + name + "}}" if spelling == "plain" else "{{" + kind + ":" + name + "}}")
        template += draw(NO_BRACES.filter(str.strip))  # text between outputs
    return template, inputs, outputs


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60, deadline=None)
@given(valid_semantic_templates())
def test_valid_templates_are_accepted_everywhere(case) -> None:
    template, inputs, outputs = case
    kinds = {**{n: INPUT for n in inputs}, **{n: OUTPUT for n in outputs}}
    segments = check_placeholders(parse_template(template), template, "f", kinds)
    assert kinds_of(segments) == kinds
    assert [s.name for s in segments if isinstance(s, Placeholder)] == [s.name for s in parse_template(template) if isinstance(s, Placeholder)]
    fn = _make_function(template, inputs, outputs)
    assert fn.kinds == kinds
    Server().submit(template, inputs, outputs)


TEMPLATE_ALPHABET = st.sampled_from(list("{}{}::ab_ \n1") + ["input", "output", "{{", "}}", "{{input:", "{{output:"])
ARBITRARY = st.one_of(
    st.text(max_size=80),
    st.lists(TEMPLATE_ALPHABET, max_size=30).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(ARBITRARY)
def test_arbitrary_strings_parse_or_raise_template_error(template: str) -> None:
    try:
        segments = parse_template(template, "f")
    except TemplateError as exc:
        assert "in the template of f" in str(exc)
        return
    # what parses is faithful: texts are the template's own text, placeholders sit on '{{'
    position = 0
    for segment in segments:
        if isinstance(segment, TextSegment):
            assert segment.text and template.startswith(segment.text, position)
            position += len(segment.text)
        else:
            assert template.startswith("{{", segment.offset) and segment.offset == position
            position = template.index("}}", position + 2) + 2
    assert position == len(template)
    # checking against any parameters also raises nothing but TemplateError
    names = sorted({s.name for s in segments if isinstance(s, Placeholder)})
    for kinds in ({n: None for n in names}, {n: INPUT for n in names}, {n: OUTPUT for n in names}, {"a": INPUT, "b": OUTPUT}):
        try:
            check_placeholders(segments, template, "f", kinds)
        except TemplateError:
            pass


@settings(max_examples=100, deadline=None)
@given(ARBITRARY)
def test_the_server_accepts_or_rejects_arbitrary_templates_cleanly(template: str) -> None:
    server = Server()
    try:
        server.submit(template, ["a"], ["b"])
    except TemplateError:
        assert server.graph.calls == {}
    else:
        assert len(server.graph.calls) == 1

