"""A multi-agent coding team writes a snake game: an architect writes the design,
programmers each write one module from it (in parallel), and a reviewer reviews the
design and all the code.

Every agent's prompt starts with the same team briefing (a prefix the engines can
share). The program asks once, for the review; the server deduces from the DAG that
the architect and the reviewer are on the critical path (latency) and that the
programmers, who all feed the reviewer and run side by side, are one task group
(throughput, batched together).
"""

import time

import parrot as P

MODULES = ["board (the grid and the food)", "snake (movement and growth)", "game loop (input, ticks and score)"]


@P.semantic_function()
def architect(task: P.Input, design: P.Output(max_tokens=48)):
    """<|im_start|>system
    You are part of a small software team that writes Python games.<|im_end|>
    <|im_start|>user
    You are the architect. Write a short design for {{task}}: the modules and what each does.<|im_end|>
    <|im_start|>assistant
    {{design}}"""


@P.semantic_function()
def programmer(design: P.Input, module: P.Input, code: P.Output(max_tokens=48)):
    """<|im_start|>system
    You are part of a small software team that writes Python games.<|im_end|>
    <|im_start|>user
    You are a programmer. The architect's design:
    {{design}}
    Write the Python code of the {{module}} module.<|im_end|>
    <|im_start|>assistant
    ```python
    {{code}}"""


@P.semantic_function()
def reviewer(design: P.Input, board: P.Input, snake: P.Input, loop: P.Input, review: P.Output(max_tokens=48)):
    """<|im_start|>system
    You are part of a small software team that writes Python games.<|im_end|>
    <|im_start|>user
    You are the reviewer. The design:
    {{design}}
    The board module:
    {{board}}
    The snake module:
    {{snake}}
    The game loop module:
    {{loop}}
    List the problems you see in the code.<|im_end|>
    <|im_start|>assistant
    {{review}}"""


def snake_game_team(task: str):
    design = architect(P.variable("task", task))
    code = [programmer(design, P.variable("module", module)) for module in MODULES]
    return design, code, reviewer(design, *code)


if __name__ == "__main__":
    with P.Runtime(model="smollm2-135m") as runtime:
        design, code, review = snake_game_team("a snake game in the terminal")
        started = time.perf_counter()
        review_text = review.get(perf=P.LATENCY)
        elapsed = time.perf_counter() - started
        print("=== architect: design ===")
        print(design.get().strip())
        for module, text in zip(MODULES, code):
            print(f"=== programmer: {module} ===")
            print(text.get().strip())
        print("=== reviewer ===")
        print(review_text.strip())
        print(f"=== {2 + len(MODULES)} agents' calls in {elapsed:.1f}s; the DAG: ===")
        print(P.format_dag(runtime.dag()))
