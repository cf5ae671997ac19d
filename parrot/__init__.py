"""parrot-serve: serve LLM applications with Semantic Variables.

    import parrot as P

    @P.semantic_function()
    def write_code(task: P.Input, code: P.Output(max_tokens=256)):
        \"\"\"You are an expert software engineer.
        Write python code of {{input:task}}.
        Code: {{output:code}}\"\"\"
"""

from parrot.frontend.function import Input, Output, native_function, semantic_function
from parrot.frontend.http_client import connect
from parrot.frontend.runtime import Runtime, format_dag
from parrot.frontend.variable import LATENCY, THROUGHPUT, SemanticVariable
from parrot.engine.structured import StructuredOutput, StructureKind
from parrot.errors import UserError

__version__ = "0.1.0"


def variable(name: str = "var", value=None) -> SemanticVariable:
    """A semantic variable of the current runtime, set now when value is given."""
    from parrot.frontend.runtime import current

    client = current()
    var = SemanticVariable(client, name)
    client.create_variable(var.var_id, name, None if value is None else str(value))
    return var


__all__ = [
    "Input", "Output", "semantic_function", "native_function", "Runtime", "connect", "variable", "format_dag",
    "SemanticVariable", "LATENCY", "THROUGHPUT", "UserError", "StructuredOutput", "StructureKind",
]
