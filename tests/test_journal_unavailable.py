"""A journal that SQLite cannot open stops the start with a clear error, not a traceback (a
state dir on 9p/NFS, where WAL mode fails with "disk I/O error", was seen in the VM lane)."""

from __future__ import annotations

import subprocess
import sys

from helpers_daemon import ROOT, AgentDaemon, to_toml


def test_unopenable_journal_is_a_clear_startup_error(tmp_path):
    """A journal path SQLite cannot open (here a directory stands in for 9p's "disk I/O
    error"; a damaged file is quarantined instead, see test_state_faults): serve exits 1
    naming the journal and the file-system requirement, without a Python traceback."""
    d = AgentDaemon(tmp_path)
    d.state_dir.mkdir(parents=True, mode=0o700)
    (d.state_dir / "journal.sqlite3").mkdir()
    d.config_path.write_text(to_toml(d.config))  # the test prefix and uid range, never defaults
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "serve", "--config", str(d.config_path),
         "--state-dir", str(d.state_dir), "--runtime-dir", str(d.runtime_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "cannot open the journal" in res.stderr and "WAL" in res.stderr
    assert "Traceback" not in res.stderr
