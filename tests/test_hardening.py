"""Self-hardening (SPEC 11) — always in a subprocess, never in the pytest process itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import prctl

from agent.hardening import CAPS_USED

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from agent.hardening import harden
    rep = harden()
    status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines()
                  if ":\\t" in l)
    comm = open("/proc/self/comm").read().strip()
    # orphan test: a grandchild whose parent exits must be reparented to us (subreaper)
    r, w = os.pipe()
    mid = os.fork()
    if mid == 0:
        g = os.fork()
        if g == 0:
            os.close(r)
            time.sleep(0.3)
            os._exit(0)
        os.write(w, str(g).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(mid, 0)
    g = int(os.read(r, 32))
    ppid = int(open(f"/proc/{g}/stat").read().rsplit(")", 1)[1].split()[1])
    os.waitpid(g, 0)
    print(json.dumps({"rep": rep, "status": status, "comm": comm, "orphan_ppid": ppid,
                      "me": os.getpid()}))
""")


def _mask(caps) -> int:
    m = 0
    for c in caps:
        m |= 1 << getattr(prctl, "CAP_" + c.upper())
    return m


def _run():
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_harden_drops_unused_caps_and_becomes_nondumpable_subreaper():
    """After harden(): non-dumpable, subreaper, named, bounding/effective/permitted = used caps only."""
    got = _run()
    rep, st = got["rep"], got["status"]
    assert rep["errors"] == [], rep["errors"]
    assert rep["dumpable"] is False and rep["subreaper"] is True
    assert got["comm"] == "nanorix-agent"
    want = _mask(CAPS_USED)
    assert int(st["CapBnd"], 16) == want & int(open("/proc/self/status").read()
                                               .split("CapBnd:\t")[1].split()[0], 16)
    assert int(st["CapEff"], 16) & ~want == 0
    assert int(st["CapPrm"], 16) & ~want == 0
    assert int(st["CapInh"], 16) == 0
    assert "sys_module" in rep["bounding_dropped"] and "sys_admin" not in rep["bounding_dropped"]
    assert got["orphan_ppid"] == got["me"]


def test_harden_reports_instead_of_raising_without_setpcap():
    """Without CAP_SETPCAP the bounding-set drops fail, harden() reports them and still returns."""
    code = ("import json, prctl; prctl.cap_effective.drop('setpcap'); "
            "from agent.hardening import harden; r = harden(); "
            "print(json.dumps([r['subreaper'], r['errors']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=True)
    subreaper, errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert subreaper is True
    assert any(e.startswith("capbset drop") for e in errors)


def test_unit_file_bounding_set_matches_caps_used():
    """The unit's CapabilityBoundingSet= lists exactly the capabilities hardening keeps."""
    unit = (ROOT / "systemd" / "nanorix-agent.service").read_text()
    line = [ln for ln in unit.splitlines() if ln.startswith("CapabilityBoundingSet=")]
    assert len(line) == 1
    listed = {c.lower().removeprefix("cap_") for c in line[0].split("=", 1)[1].split()}
    assert listed == set(CAPS_USED)
