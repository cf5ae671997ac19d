"""Prompt templates: `{{input:x}}`, `{{output:y}}` or plain `{{x}}` placeholders.

Parsing is shared by the client (errors at decoration time) and the server (it
checks again, since clients can be anything). Every error names the problem and
shows where in the template it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from parrot.errors import UserError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_TEMPLATE_CHARS = 1_000_000
MAX_PLACEHOLDERS = 1_000
# templates have no escape for double braces; text holding them travels as an input's value
_LITERAL_BRACES = "(a prompt that needs literal '{{' or '}}' gets that text through an input)"


class TemplateError(UserError):
    """A prompt template that cannot be used; the message points at the problem."""


class PlaceholderKind(Enum):
    INPUT = "input"
    OUTPUT = "output"


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class Placeholder:
    name: str
    kind: PlaceholderKind | None  # None: plain {{name}}, kind from the parameter's annotation
    offset: int


Segment = TextSegment | Placeholder


def _where(template: str, offset: int, function: str) -> str:
    line_no = template.count("\n", 0, offset) + 1
    line_start = template.rfind("\n", 0, offset) + 1
    line_end = template.find("\n", offset)
    line = template[line_start : line_end if line_end != -1 else len(template)]
    column = offset - line_start
    return f"in the template of {function}, line {line_no}:\n    {line}\n    {' ' * column}^"


def parse_template(template: str, function: str = "<template>") -> list[Segment]:
    """Splits a template into text and placeholders; raises TemplateError on bad syntax."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the template of {function} has {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    segments: list[Segment] = []
    pos = 0
    while pos < len(template):
        open_at = template.find("{{", pos)
        close_at = template.find("}}", pos)
        if close_at != -1 and (open_at == -1 or close_at < open_at):
            raise TemplateError(f"unbalanced braces: '}}}}' with no '{{{{' before it {_LITERAL_BRACES} {_where(template, close_at, function)}")
        if open_at == -1:
            segments.append(TextSegment(template[pos:]))
            break
        if open_at > pos:
            segments.append(TextSegment(template[pos:open_at]))
        close_at = template.find("}}", open_at + 2)
        nested = template.find("{{", open_at + 2)
        if close_at == -1 or (nested != -1 and nested < close_at):
            raise TemplateError(f"unbalanced braces: '{{{{' is never closed with '}}}}' {_LITERAL_BRACES} {_where(template, open_at, function)}")
        segments.append(_placeholder(template[open_at + 2 : close_at].strip(), open_at, template, function))
        if sum(isinstance(s, Placeholder) for s in segments) > MAX_PLACEHOLDERS:
            raise TemplateError(f"the template of {function} has more than {MAX_PLACEHOLDERS} placeholders")
        pos = close_at + 2
    return segments


def _placeholder(body: str, offset: int, template: str, function: str) -> Placeholder:
    kind: PlaceholderKind | None = None
    name = body
    if ":" in body:
        kind_text, name = (part.strip() for part in body.split(":", 1))
        if not _NAME.match(kind_text):
            raise TemplateError(f"{{{{{body}}}}} is not a placeholder {_LITERAL_BRACES} {_where(template, offset, function)}")
        try:
            kind = PlaceholderKind(kind_text)
        except ValueError:
            raise TemplateError(
                f"unknown placeholder kind {kind_text!r} (use input or output, e.g. {{{{input:{name or 'x'}}}}}) "
                f"{_where(template, offset, function)}"
            ) from None
    if not _NAME.match(name):
        raise TemplateError(f"placeholder {{{{{body}}}}} needs a Python identifier as its name {_LITERAL_BRACES} "
                            f"{_where(template, offset, function)}")
    return Placeholder(name, kind, offset)


def check_placeholders(
    segments: list[Segment], template: str, function: str, kinds: dict[str, PlaceholderKind]
) -> list[Segment]:
    """Resolves each placeholder's kind from the parameters and checks the template's shape.

    kinds: parameter name -> declared kind (from annotations; absent when the
    template says it). Returns segments whose placeholders all carry a kind.
    """
    resolved: list[Segment] = []
    outputs_seen: set[str] = set()
    inputs_seen: set[str] = set()
    used: set[str] = set()
    previous_output: Placeholder | None = None
    for segment in segments:
        if isinstance(segment, TextSegment):
            if segment.text.strip():
                previous_output = None
            resolved.append(segment)
            continue
        where = _where(template, segment.offset, function)
        if segment.name not in kinds:
            raise TemplateError(f"placeholder {segment.name!r} has no parameter of that name in {function}'s signature {where}")
        declared = kinds[segment.name]
        kind = segment.kind or declared
        if kind is None:
            raise TemplateError(
                f"placeholder {{{{{segment.name}}}}} has no kind: write {{{{input:{segment.name}}}}} or annotate the parameter with P.Input / P.Output {where}"
            )
        if declared is not None and segment.kind is not None and declared != segment.kind:
            raise TemplateError(f"{segment.name!r} is annotated {declared.value} but used as {segment.kind.value} {where}")
        if kind is PlaceholderKind.OUTPUT:
            if not any(isinstance(s, Placeholder) or s.text.strip() for s in resolved):
                raise TemplateError(f"output {segment.name!r} comes first; put the prompt (text or an input) before it {where}")
            if segment.name in outputs_seen:
                raise TemplateError(f"output {segment.name!r} is used twice; each output is generated once {where}")
            if segment.name in inputs_seen:
                raise TemplateError(f"{segment.name!r} is an input and cannot also be an output {where}")
            if previous_output is not None:
                raise TemplateError(
                    f"outputs {previous_output.name!r} and {segment.name!r} have no text between them, so the model "
                    f"could not tell where one ends {where}"
                )
            outputs_seen.add(segment.name)
            previous_output = segment
        else:
            previous_output = None
            if segment.name in outputs_seen:
                raise TemplateError(f"{segment.name!r} is an output and cannot also be an input {where}")
            inputs_seen.add(segment.name)
        used.add(segment.name)
        resolved.append(Placeholder(segment.name, kind, segment.offset))
    unused = [name for name in kinds if name not in used]
    if unused:
        raise TemplateError(f"parameter(s) {', '.join(map(repr, unused))} of {function} never appear in its template; use them as {{{{name}}}} or remove them")
    if not outputs_seen:
        raise TemplateError(f"the template of {function} has no output placeholder; add one such as {{{{output:answer}}}}")
    return resolved
