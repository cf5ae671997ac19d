"""Forked contexts: a child of a filled parent behaves like a fresh prefill of its whole text."""

from __future__ import annotations

import asyncio

import pytest

from parrot.errors import ContextError

from conftest import collect, fill_and_generate, greedy, run, token_ids

MAX_TOKENS = 10
SYSTEM = "You are a helpful assistant. Answer briefly and correctly, in plain English. Question:"
QUESTIONS = [" What is the capital of Italy?", " Name a bird that can talk.", " How many legs has a spider?"]


@pytest.fixture
def prefix(engine) -> list[int]:
    ids = engine.tokenizer.encode(SYSTEM)
    # the fork point falls inside a block, so children and parent share a partly filled block
    assert len(ids) % engine.config.block_size != 0
    return ids


def fresh(engine, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    return token_ids(run(fill_and_generate(engine, "fresh", ids, greedy(max_tokens))))


def test_children_generate_like_a_fresh_prefill(engine, prefix):
    questions = [engine.tokenizer.encode(q) for q in QUESTIONS]

    async def forked():
        await engine.fill("parent", None, prefix)
        # children decode side by side, writing into copies of the shared partial block
        results = await asyncio.gather(
            *[fill_and_generate(engine, f"child-{i}", q, greedy(MAX_TOKENS), parent="parent") for i, q in enumerate(questions)]
        )
        engine.check_integrity()
        engine.free_context("parent")
        return results

    children = run(forked())
    for question, child in zip(questions, children):
        assert token_ids(child) == fresh(engine, prefix + question)


def test_parent_is_unchanged_by_its_children(engine, prefix):
    question = engine.tokenizer.encode(QUESTIONS[0])

    async def scenario():
        await engine.fill("parent", None, prefix)
        child = await fill_and_generate(engine, "child", question, greedy(MAX_TOKENS), parent="parent", free=False)
        parent = await collect(engine, "parent", greedy(MAX_TOKENS))  # appends after the shared block
        child_again = await collect(engine, "child", greedy(4))  # the child's KV survived the parent's writes
        for cid in ("parent", "child"):
            engine.free_context(cid)
        return child, parent, child_again

    child, parent, child_again = run(scenario())
    assert token_ids(parent) == fresh(engine, prefix)
    whole_child = fresh(engine, prefix + question, MAX_TOKENS + 4)
    assert token_ids(child) + token_ids(child_again) == whole_child


def test_child_without_new_tokens_generates_like_its_parent(engine, prefix):
    async def scenario():
        await engine.fill("parent", None, prefix)
        await engine.fill("twin", "parent", [])
        twin = await collect(engine, "twin", greedy(MAX_TOKENS))
        for cid in ("parent", "twin"):
            engine.free_context(cid)
        return twin

    assert token_ids(run(scenario())) == fresh(engine, prefix)


def test_freeing_the_parent_keeps_children_working(engine, prefix):
    q0, q1 = (engine.tokenizer.encode(q) for q in QUESTIONS[:2])

    async def scenario():
        await engine.fill("parent", None, prefix)
        await engine.fill("child-0", "parent", q0)
        await engine.fill("child-1", "parent", q1)
        await engine.fill("grandchild", "child-1", q0)
        engine.free_context("parent")
        engine.check_integrity()
        with pytest.raises(ContextError):
            await engine.fill("orphan", "parent", q0)  # the parent is gone
        results = await asyncio.gather(
            fill_and_generate(engine, "child-0", [], greedy(MAX_TOKENS)),
            fill_and_generate(engine, "child-1", [], greedy(MAX_TOKENS), free=False),
        )
        engine.free_context("child-1")
        grandchild = await fill_and_generate(engine, "grandchild", [], greedy(MAX_TOKENS))
        return results, grandchild

    (child0, child1), grandchild = run(scenario())
    assert token_ids(child0) == fresh(engine, prefix + q0)
    assert token_ids(child1) == fresh(engine, prefix + q1)
    assert token_ids(grandchild) == fresh(engine, prefix + q1 + q0)


def test_fork_shares_blocks_instead_of_copying(engine, prefix):
    async def scenario():
        await engine.fill("parent", None, prefix)
        used_by_parent = engine.stats().blocks_total - engine.stats().blocks_free
        for i in range(4):
            await engine.fill(f"child-{i}", "parent", [])
        assert engine.stats().blocks_total - engine.stats().blocks_free == used_by_parent
        for cid in ["parent"] + [f"child-{i}" for i in range(4)]:
            engine.free_context(cid)

    run(scenario())


def test_context_errors_are_clear(engine, prefix):
    async def scenario():
        with pytest.raises(ContextError, match="unknown context"):
            await engine.fill("child", "no-such-parent", prefix)
        with pytest.raises(ContextError, match="unknown context"):
            await collect(engine, "no-such-context", greedy(1))
        await engine.fill("a", None, prefix)
        await engine.fill("b", None, prefix)
        await engine.fill("c", "a", [])
        with pytest.raises(ContextError, match="another parent"):
            await engine.fill("c", "b", [1])
        await engine.fill("empty", None, [])
        with pytest.raises(ContextError, match="empty"):
            await collect(engine, "empty", greedy(1))
        with pytest.raises(ContextError, match="already exists"):
            engine.contexts.create("a", None)
        for cid in ("a", "b", "c", "empty"):
            engine.free_context(cid)
        with pytest.raises(ContextError):
            engine.free_context("a")

    run(scenario())
