"""A LIFO cleanup stack: what creating a sandbox did, undone newest first, exactly once.

`engine.create` (and `engine.adopt`) push one named undo per thing made; a failed create
runs the stack at once, a made sandbox keeps it and `Sandbox.teardown` runs it.  The
destruction steps undo single pieces early (`call`/`acall` by name: the kill of PID 1 in
step 3, the tmpfs detach in step 2, the slot in step 5); each piece still runs only once,
so teardown skips what a step already did.  Errors are collected, never stop the rest.

Like contextlib.(Async)ExitStack, plus run-one-by-name and error collection (ExitStack
raises the first error and has no way to run one callback early).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Undo:
    name: str
    fn: Callable[[], object]
    done: bool = False


class CleanupStack:
    def __init__(self) -> None:
        self._items: list[_Undo] = []
        self.errors: list[tuple[str, BaseException]] = []

    def push(self, name: str, fn: Callable[[], object]) -> None:
        """Register the undo of something just made (sync or async callable)."""
        self._items.append(_Undo(name, fn))

    def names(self) -> list[str]:
        return [u.name for u in self._items if not u.done]

    def done(self, name: str) -> bool:
        """True when no undo `name` is waiting (it ran, or was never pushed)."""
        return not any(u.name == name and not u.done for u in self._items)

    def _take(self, name: str) -> _Undo | None:
        for u in reversed(self._items):
            if u.name == name and not u.done:
                u.done = True
                return u
        return None

    def call(self, name: str) -> None:
        """Run the (sync) undo `name` now if it has not run; its error propagates."""
        u = self._take(name)
        if u is not None:
            r = u.fn()
            assert not inspect.isawaitable(r), f"{name} is async: use acall"

    async def acall(self, name: str) -> None:
        """Run the undo `name` now (sync or async) if it has not run; errors propagate."""
        u = self._take(name)
        if u is not None:
            r = u.fn()
            if inspect.isawaitable(r):
                await r

    async def run(self, on_error: Callable[[str, BaseException], None] | None = None
                  ) -> list[tuple[str, BaseException]]:
        """Run every undo not yet run, newest first; returns (and keeps) the errors."""
        errors: list[tuple[str, BaseException]] = []
        for u in reversed(self._items):
            if u.done:
                continue
            u.done = True
            try:
                r = u.fn()
                if inspect.isawaitable(r):
                    await r
            except Exception as e:  # keep undoing; report each
                errors.append((u.name, e))
                if on_error is not None:
                    on_error(u.name, e)
        self.errors.extend(errors)
        return errors
