"""The `multi-agent` workload (the paper's Figure 17): the snake-game coding team.

An architect writes a design; each programmer writes one file from it; a reviewer
reviews each file; the programmer revises it; an integrator combines the revised
files. Every role's function starts with the team's guidelines (a constant prefix)
and the design is shared by every programmer, reviewer and revision (a dynamic
one). The program asks once, for the integrated program, with get(perf=LATENCY).
Baselines: the latency-centric and throughput-centric policies on an engine that
shares prefixes the way vLLM does (block-level prefix caching, no shared-prefix
attention, no static prefix hints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import parrot as P
from parrot.bench import apps
from parrot.bench.config import pick_size
from parrot.bench.documents import passages
from parrot.bench.systems import RunningServer, peak_batch_blocks

TASK = "a snake game in Python with a board, a snake, food, a score and a game loop"
COMPONENTS = ("board.py: the grid", "snake.py: the snake's body and moves", "food.py: placing food", "score.py: the score",
              "loop.py: the game loop", "input.py: the keyboard", "render.py: drawing", "config.py: the settings")
MULTI_AGENT_POLICIES = {"parrot": [], "latency-centric": ["--no-shared-attention"], "throughput-centric": ["--no-shared-attention"]}


@dataclass(frozen=True)
class MultiAgentConfig:
    team_sizes: tuple[int, ...]  # programmers per run, rising
    guidelines_tokens: int
    design_tokens: int
    code_tokens: int
    review_tokens: int
    program_tokens: int
    engines: int = 1
    engine: str = "builtin"  # or sim:PRESET: a simulated engine, for the paper's prompt lengths and GPU
    paper: str = ""
    # the baselines' built-in engines cache prefixes (as vLLM does today); off: as the paper's
    # vLLM ran (before automatic prefix caching), each call prefilling its whole prompt
    baselines_cache_prefixes: bool = True

    def policy_flags(self) -> dict[str, list[str]]:
        """Each policy's serve flags. A simulated engine takes its settings from its preset, and
        without static prefix hints (the baselines) it shares no prefix at all, as vLLM did in
        the paper's time (before automatic prefix caching)."""
        if self.engine.startswith("sim:"):
            return {policy: ["--engine", self.engine] for policy in MULTI_AGENT_POLICIES}
        if not self.baselines_cache_prefixes:
            return {policy: flags + (["--no-prefix-caching"] if policy != "parrot" else []) for policy, flags in MULTI_AGENT_POLICIES.items()}
        return MULTI_AGENT_POLICIES

    @property
    def baselines(self) -> str:
        """How the baselines share prefixes, for reports."""
        if self.engine.startswith("sim:"):
            return "no prefix sharing (a simulated engine without static prefix hints)"
        return "block prefix caching" if self.baselines_cache_prefixes else "no prefix caching (as the paper's vLLM ran)"


MULTI_AGENT_WORKLOADS: dict[str, tuple[MultiAgentConfig, MultiAgentConfig]] = {
    "multi-agent": (
        MultiAgentConfig(team_sizes=(4, 8, 16), guidelines_tokens=512, design_tokens=48, code_tokens=48, review_tokens=24,
                         program_tokens=32,
                         paper="Fig. 17: 8.9x faster than latency-centric vLLM, 2.4x than throughput-centric; KV blocks 1258 vs 2844"),
        MultiAgentConfig(team_sizes=(2,), guidelines_tokens=64, design_tokens=4, code_tokens=4, review_tokens=4, program_tokens=4),
    ),
    # the paper's prompt and output lengths on one SIMULATED A100 with LLaMA-13B: the real
    # manager and policies, modelled steps and KV capacity
    "multi-agent-sim": (
        MultiAgentConfig(team_sizes=(4, 8, 16, 32), guidelines_tokens=2048, design_tokens=256, code_tokens=256, review_tokens=128,
                         program_tokens=256, engine="sim:a100-13b",
                         paper="Fig. 17: 8.9x faster than latency-centric vLLM, 2.4x than throughput-centric; KV blocks 1258 vs 2844"),
        MultiAgentConfig(team_sizes=(2,), guidelines_tokens=64, design_tokens=4, code_tokens=4, review_tokens=4, program_tokens=4,
                         engine="sim:a100-13b"),
    ),
}


@dataclass
class TeamRun:
    programmers: int
    latency_s: float
    program: str
    peak_batch_blocks: int | None  # cumulative over the server's run so far


@dataclass
class MultiAgentResult:
    policy: str
    runs: list[TeamRun]


# the paper's prompt and output lengths (multi-agent-sim's) for a built-in engine on a GPU (--paper-scale
# --device cuda): up to 16 programmers, so that a stage of the GPU suite holds all three policies
PAPER_SIZES: dict[str, MultiAgentConfig] = {
    "multi-agent": replace(MULTI_AGENT_WORKLOADS["multi-agent-sim"][0], team_sizes=(4, 8, 16), engine="builtin"),
}


def quick_or_full(name: str, quick: bool, paper_scale: bool = False, baselines_cache_prefixes: bool = True) -> MultiAgentConfig:
    config = PAPER_SIZES[name] if paper_scale else pick_size(MULTI_AGENT_WORKLOADS, name, quick)
    return replace(config, baselines_cache_prefixes=baselines_cache_prefixes)


def team(guidelines: str, config: MultiAgentConfig, programmers: int) -> P.SemanticVariable:
    head = f"Team guidelines: {guidelines}\n\n"
    architect = apps.semantic("architect", head + "You are the architect. Write the design of {{input:chunk}}.\nDesign:{{output:summary}}",
                              ["chunk"], config.design_tokens)
    programmer = apps.semantic("programmer", head + "You are a programmer. Design: {{input:design}}\nWrite the file {{input:chunk}}.\n"
                               "Code:{{output:summary}}", ["design", "chunk"], config.code_tokens)
    reviewer = apps.semantic("reviewer", head + "You are a reviewer. Design: {{input:design}}\nCode: {{input:chunk}}\n"
                             "Review:{{output:summary}}", ["design", "chunk"], config.review_tokens)
    reviser = apps.semantic("reviser", head + "You are a programmer. Design: {{input:design}}\nCode: {{input:chunk}}\n"
                            "Review: {{input:review}}\nRevised code:{{output:summary}}", ["design", "chunk", "review"], config.code_tokens)
    files = "\n".join(f"File {i}: {{{{input:part{i}}}}}" for i in range(programmers))
    integrator = apps.semantic("integrator", f"Combine these files into one program.\n{files}\nProgram:{{{{output:summary}}}}",
                               [f"part{i}" for i in range(programmers)], config.program_tokens)
    design = architect(chunk=f"{TASK}, written by {programmers} programmers")  # each team size its own design
    revised = []
    for i in range(programmers):
        component = f"{COMPONENTS[i % len(COMPONENTS)]} (part {i})"
        code = programmer(design=design, chunk=component)
        review = reviewer(design=design, chunk=code)
        revised.append(reviser(design=design, chunk=code, review=review))
    return integrator(**{f"part{i}": file for i, file in enumerate(revised)})


def run_multi_agent(config: MultiAgentConfig, policy: str, server: RunningServer, tokenizer) -> MultiAgentResult:
    guidelines = passages(tokenizer, [config.guidelines_tokens])[0].strip()
    runs = []
    for programmers in config.team_sizes:
        with P.connect(server.url, api_key=server.api_key):
            started = time.perf_counter()
            program = team(guidelines, config, programmers).get(perf=P.LATENCY)
            elapsed = time.perf_counter() - started
        runs.append(TeamRun(programmers, elapsed, program, peak_batch_blocks(server)))
    return MultiAgentResult(policy, runs)
