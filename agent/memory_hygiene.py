"""The agent's own memory forgets customer bytes (issue 13, SPEC 13 "limits").

Customer data (input, env values, command text, output) passes through Python objects:
msgpack decodes it into `bytes`/`str`, trio reads it in `bytes`, the exec path joins it into
request messages.  Those objects are immutable and are freed by the interpreter wherever
the last reference drops, so they cannot all be zeroed by hand.  The daemon therefore runs
with an allocator that overwrites memory when it is freed, and wipes the mutable buffers it
owns (exec capture, pipe read buffers, the RPC decoder buffer) itself:

- `PYTHONMALLOC=malloc`: no pymalloc arenas; every Python object lives in glibc malloc
  (pymalloc reuses freed 512-byte blocks without ever clearing them);
- `GLIBC_TUNABLES`: `glibc.malloc.perturb` (freed heap chunks are filled with
  PERTURB_BYTE before they go back to a free list or to the kernel) and
  `glibc.malloc.tcache_count=0` (glibc skips the perturb fill for chunks it parks in the
  per-thread cache).  Chunks above glibc's mmap threshold (128 KiB, rising to at most
  32 MiB with use) are unmapped whole when freed: gone from the agent at once, but their
  pages keep their content in RAM until the kernel reuses them (init_on_free=0).  Raising
  the threshold to 32 MiB would have them perturbed too, but doubled destroy times here
  (the wipe and Merkle buffers of steps 2, 3 and 6 then pay a fill on malloc and on free):
  measured, not chosen; SPEC 13 already reports init_on_free for what the kernel keeps.

These settings act only from process start, so `serve` re-executes itself with them
(`ensure_wiping_allocator`), in the foreground and under systemd alike.  `measure()` checks
the effect instead of assuming it: it frees a canary object and reads its old address back
through /proc/self/mem (a read that cannot crash on an unmapped page).  Step 4 of every
destruction records the result as evidence (`agent_memory`).

What this does not reach is in docs/security.md ("Limits of the claims"): memory freed by
the kernel (pipe and socket buffers, page cache, unmapped large chunks), copies held by
live objects the agent still references, and the CLI client.
"""

from __future__ import annotations

import gc
import os
import secrets
import sys

PERTURB_BYTE = 0xA5
TUNABLES = {
    "glibc.malloc.perturb": str(PERTURB_BYTE),
    "glibc.malloc.tcache_count": "0",
}
# young and middle generations: cycles made by the session's requests (an exception's
# traceback holding a frame's locals) are young; a full collection cost 10-270 ms per
# destroy here, this one well under 1 ms.  Older cycles go at Python's next full collection.
GC_GENERATION = 1
_REEXEC_MARK = "NANORIX_AGENT_WIPING_ALLOCATOR"
_BYTES_HEADER = sys.getsizeof(b"") - 1  # offset of a bytes object's data from id()



def wanted_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with PYTHONMALLOC=malloc and our tunables merged into GLIBC_TUNABLES (other
    tunables already there are kept)."""
    out = dict(env)
    out["PYTHONMALLOC"] = "malloc"
    have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    kept = [t for t in have if t.split("=", 1)[0] not in TUNABLES]
    out["GLIBC_TUNABLES"] = ":".join(kept + [f"{k}={v}" for k, v in TUNABLES.items()])
    return out


def configured(env: dict[str, str] | None = None) -> bool:
    """The environment this process started with asks for the wiping allocator."""
    env = dict(os.environ if env is None else env)
    if env.get("PYTHONMALLOC") != "malloc":
        return False
    have = dict(t.split("=", 1) for t in env.get("GLIBC_TUNABLES", "").split(":") if "=" in t)
    return all(have.get(k) == v for k, v in TUNABLES.items())


def ensure_wiping_allocator() -> None:
    """Re-execute this process (same pid, same argv) with the wiping allocator's environment
    when it did not start with it.  Call before any thread exists.  Never loops: after one
    re-exec the process runs on whatever it got, and `measure()` reports that honestly."""
    if configured() or os.environ.get(_REEXEC_MARK):
        return
    env = wanted_env(dict(os.environ))
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def _freed_canary_overwritten(size: int) -> bool:
    """Free a `size`-byte object holding a random pattern and read its old address back
    through /proc/self/mem: True when none of the pattern is left there.  An unmapped
    address (the chunk went back to the kernel) reads as an error and counts as gone."""
    pattern = secrets.token_bytes(16)
    after = bytearray(size)  # allocated first, so it cannot take the canary's place
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # cannot measure: not reported as wiped
    try:
        canary = pattern * (size // 16)
        addr = id(canary) + _BYTES_HEADER
        del canary
        try:
            os.preadv(fd, [after], addr)
        except OSError:
            return True
    finally:
        os.close(fd)
    return pattern not in after


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now (modules, config, the service as
    built at start) into the collector's permanent generation (`gc.freeze`), and return
    how many.  A full collection then walks only what was made since: measured in a bench
    daemon over 200 lifecycles, 5 full collections of ~16 ms of the event loop each before
    (0.40 ms per lifecycle), 9 of ~2.9 ms after (0.13 ms).  Objects made later (every
    session's, customer data included) are collected as before; step 4's
    young-generation collection is unchanged."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def measure(buffers_zeroed: int) -> dict:
    """Evidence for step 4: free anything unreachable still holding the session's objects
    (a garbage collection of the young generations), then check that freed memory is cleared (overwritten, or
    unmapped: no longer readable in the agent) for a small and a large object, and report
    `buffers_zeroed`, the bytes of the session's exec buffers the agent zeroed."""
    collected = gc.collect(GC_GENERATION)
    small = _freed_canary_overwritten(256)
    large = _freed_canary_overwritten(256 * 1024)
    return {
        "allocator": "malloc" if os.environ.get("PYTHONMALLOC") == "malloc" else "pymalloc",
        "free_perturb_configured": configured(),
        "freed_small_cleared": small,
        "freed_large_cleared": large,
        "gc_unreachable_freed": int(collected),
        "exec_buffers_zeroed_bytes": int(buffers_zeroed),
    }
