"""The sandbox's LIFO cleanup stack (agent/sandbox/cleanup.py): pure bookkeeping, so
tested on its own with plain callables."""

from __future__ import annotations

import pytest

from agent.sandbox.cleanup import CleanupStack


async def test_runs_newest_first_once_and_collects_errors():
    """run() undoes newest first, each undo exactly once (also when run twice), keeps
    going past a failing undo and returns every error with its name."""
    done: list[str] = []
    c = CleanupStack()
    c.push("a", lambda: done.append("a"))

    def boom() -> None:
        raise OSError("b failed")

    c.push("b", boom)

    async def later() -> None:
        done.append("c")

    c.push("c", later)
    errors = await c.run()
    assert done == ["c", "a"]
    assert [(n, str(e)) for n, e in errors] == [("b", "b failed")]
    assert await c.run() == [] and done == ["c", "a"]
    assert c.done("a") and c.done("b") and c.done("never-pushed")


async def test_a_piece_undone_early_is_skipped_by_run():
    """call()/acall() run one undo by name now (errors propagate); run() then skips it."""
    done: list[str] = []
    c = CleanupStack()
    c.push("slot", lambda: done.append("slot"))
    c.push("mount", lambda: done.append("mount"))
    c.call("slot")
    c.call("slot")  # idempotent
    assert not c.done("mount") and c.names() == ["mount"]
    await c.run()
    assert done == ["slot", "mount"]
    c.push("bad", lambda: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):
        await c.acall("bad")
    assert c.done("bad")
