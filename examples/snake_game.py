"""The poster's program: write code for a task, then tests for that code.

WriteTestCode consumes WritePythonCode's output on the server: the program asks
for both results once, and no round trip happens between the two calls.
"""

import time

import parrot as P


@P.semantic_function()
def write_python_code(task: P.Input, code: P.Output(max_tokens=160)):
    """You are an expert software engineer.
    Write python code of {{input:task}}.
    Code: {{output:code}}"""


@P.semantic_function()
def write_test_code(task: P.Input, code: P.Input, test: P.Output(max_tokens=160)):
    """You are an experienced QA engineer.
    You write test code for {{input:task}}.
    Code: {{input:code}}.
    Your test code: {{output:test}}"""


def write_snake_game():
    task = P.variable("task", "a snake game")
    code = write_python_code(task)
    test = write_test_code(task, code)
    return code.get(perf=P.LATENCY), test.get(perf=P.LATENCY)


if __name__ == "__main__":
    with P.Runtime(model="smollm2-135m") as runtime:
        started = time.perf_counter()
        code, test = write_snake_game()
        elapsed = time.perf_counter() - started
        print("=== code ===")
        print(code.strip())
        print("=== test ===")
        print(test.strip())
        print(f"=== 2 dependent calls in {elapsed:.1f}s, {runtime.client_calls} client calls, server-side DAG: ===")
        print(P.format_dag(runtime.dag()))
