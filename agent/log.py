"""Structured JSON logs (structlog) to stderr.  Events carry `session_id`, `step`,
`duration_ms` where relevant and never commands, input, output or file names.

Two properties an operator relies on:

- **Logging can never kill the daemon.**  Lines are written with one `os.write` per line to
  file descriptor 2; when that fails (the reader of a `serve 2>&1 | jq` pipe exited: EPIPE,
  or any other OSError) the descriptor is replaced by /dev/null (and stdout too when it was
  the same pipe), so neither this writer nor anything else that writes to fd 1/2 later
  (Python's own stderr at exit, a C library) can fail again.  The lost lines are counted
  (`dropped_lines()`), the daemon goes on.
- **journald sees the level.**  When `$JOURNAL_STREAM` names the device and inode of our
  stderr (systemd sets it for `StandardError=journal`; sd-daemon(3), systemd.exec(5)), each
  line starts with the sd-daemon priority prefix `<N>` (`<7>` debug, `<6>` info, `<4>`
  warning, `<3>` error, `<2>` critical), so `journalctl -p warning` finds failures.  With
  stderr on a terminal or a file, lines are plain JSON.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# sd-daemon(3) priorities (syslog levels)
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_state = {"level": logging.INFO}


def _filter_level(_logger, method_name, event_dict):
    if _LEVELS.get(method_name, logging.ERROR) < _state["level"]:
        raise structlog.DropEvent
    return event_dict


def journal_stream_matches(fd: int = 2, environ: dict | None = None) -> bool:
    """True when `$JOURNAL_STREAM` ("DEV:INODE") names the file behind `fd`."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class SafeWriter:
    """Writes whole lines to a file descriptor; never raises (see the module docstring)."""

    def __init__(self, fd: int = 2, *, journal: bool | None = None) -> None:
        self.fd = fd
        self.journal = journal_stream_matches(fd) if journal is None else journal
        self.dropped = 0
        self.broken = False
        self._lock = threading.Lock()

    def write_line(self, line: str, level: str = "info") -> None:
        if self.journal:
            line = f"<{PRIORITIES.get(level, 6)}>{line}"
        data = (line + "\n").encode("utf-8", "replace")
        with self._lock:
            if self.broken:
                self.dropped += 1
                return
            try:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except BlockingIOError:
                self.dropped += 1  # a full non-blocking pipe: drop the line, keep serving
            except OSError:
                self.dropped += 1
                self._retire()

    def _retire(self) -> None:
        """The stream is gone: point fd (and stdout when it shared the stream) at /dev/null."""
        self.broken = True
        try:
            st = os.fstat(self.fd)
            same_stdout = self.fd != 1 and _same_file(1, st)
        except OSError:
            same_stdout = False
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.dup2(null, self.fd)
            if same_stdout:
                os.dup2(null, 1)
        except OSError:
            pass
        finally:
            os.close(null)


def _same_file(fd: int, st: os.stat_result) -> bool:
    try:
        other = os.fstat(fd)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


class _LineLogger:
    """structlog logger: the final processor hands it (level, line)."""

    def __init__(self, writer: SafeWriter) -> None:
        self._writer = writer

    def msg(self, message, level: str = "info") -> None:
        self._writer.write_line(str(message), level)

    debug = info = warning = warn = error = critical = exception = fatal = failure = log = msg


def _gated(name: str, level: int):
    """A bound-logger method that returns at once when `level` is below the configured
    one: no event dict is built and no processor runs (a destruction makes ~10 info
    calls; at level warning each cost a context copy and a DropEvent raised and caught)."""

    def method(self, event=None, *args, **kw):
        if level < _state["level"]:
            return None
        return self._proxy_to_logger(name, event, *args, **kw)

    method.__name__ = name
    return method


class _BoundLogger(structlog.BoundLogger):
    """structlog's generic bound logger with the level checked before anything is built
    (`_filter_level` stays in the chain for any other method name)."""

    debug = _gated("debug", logging.DEBUG)
    info = _gated("info", logging.INFO)
    warning = warn = _gated("warning", logging.WARNING)
    error = _gated("error", logging.ERROR)
    exception = _gated("exception", logging.ERROR)
    critical = _gated("critical", logging.CRITICAL)


def _render(_logger, method_name, event_dict):
    level = event_dict.get("level", method_name)
    # structlog's (args, kwargs) form: the logger gets the line and the level
    return (json.dumps(event_dict, sort_keys=True, default=str),), {"level": level}


_writer: dict = {"w": None}


def setup(level: str = "info", stream=None, *, fd: int | None = None,
          journal: bool | None = None) -> SafeWriter:
    """Configure structlog.  `fd` (default: `stream`'s descriptor or 2) receives the lines."""
    set_level(level)
    if fd is None:
        fd = stream.fileno() if stream is not None else 2
    writer = SafeWriter(fd, journal=journal)
    _writer["w"] = writer
    structlog.configure(
        processors=[
            _filter_level,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render,
        ],
        logger_factory=lambda *_a: _LineLogger(writer),
        wrapper_class=_BoundLogger,
        cache_logger_on_first_use=False,
    )
    return writer


def console(message: str, level: str = "error") -> None:
    """One human-readable line on stderr (e.g. why the daemon refuses to start), through the
    same never-failing writer, so journald files it at `level` too."""
    w = _writer["w"] or SafeWriter(2)
    w.write_line(f"nanorix-agent: {message}", level)


def dropped_lines() -> int:
    """Log lines that could not be written since setup (a broken or full stderr)."""
    w = _writer["w"]
    return w.dropped if w is not None else 0


def set_level(level: str) -> None:
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}")
    _state["level"] = _LEVELS[level]


def get_level() -> str:
    return next(k for k, v in _LEVELS.items() if v == _state["level"])


def get(name: str = "nanorix-agent", **bind):
    return structlog.get_logger(name).bind(**bind)
