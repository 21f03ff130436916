"""Operations (SPEC 9-12): systemd notify, self-hardening, health self-tests, debug socket,
metrics and crash recovery.  `agent/daemon.py` wires them; see docs/design.md "Operations: Daemon hooks"."""
