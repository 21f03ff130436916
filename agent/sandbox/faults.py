"""What the sandbox layer raises about an exec, as domain errors with no HTTP meaning.
The RPC edge turns them into API errors through one table (agent/rpc/methods.py
`SANDBOX_ERRORS`).  Like isolate, two kinds are kept apart: a *verdict* on the request or
the session (the customer's doing: refused, does not fit, busy, gone) and the sandbox's own
*death* (it could not do what it should: `ExecFailed`, an internal error)."""

from __future__ import annotations


class SandboxFault(Exception):
    """Base of the exec errors; `field` names the request field at fault, if any."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ExecRefused(SandboxFault):
    """Verdict: the request can never run in this sandbox (too large, a NUL, a bad env name)."""


class InputDoesNotFit(SandboxFault):
    """Verdict: the customer filled their session's file system; the input cannot be written."""


class ExecBusy(SandboxFault):
    """Verdict: another command is running in this sandbox."""

    def __init__(self) -> None:
        super().__init__("a command is already running in this session")


class SandboxGone(SandboxFault):
    """Verdict: the sandbox's PID 1 is dead (killed, OOM, destroyed)."""

    def __init__(self, why: str = "the sandbox is gone") -> None:
        super().__init__(why)


class ExecFailed(SandboxFault):
    """Death: nrx-init could not start the command (a setup step failed)."""
