"""Session sandboxes (SPEC 3, 4): one module per layer, `engine.py` is the ordered plan.

    engine = SandboxEngine(cfg)
    sb = await engine.create("sess_...", tier="free", classification="general")
    res = await sb.exec("echo hi", timeout=10)
    await sb.teardown()
"""

from .engine import Sandbox, SandboxEngine, SandboxError
from .exec import ExecResult
from .faults import ExecBusy, ExecFailed, SandboxGone

__all__ = ["ExecBusy", "ExecFailed", "ExecResult", "Sandbox", "SandboxEngine", "SandboxError",
           "SandboxGone"]
