"""Structured JSON logs (structlog) to stderr.  Events carry `session_id`, `step`,
`duration_ms` where relevant and never commands, input, output or file names."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_state = {"level": logging.INFO}


def _filter_level(_logger, method_name, event_dict):
    if _LEVELS.get(method_name, logging.INFO) < _state["level"]:
        raise structlog.DropEvent
    return event_dict


def setup(level: str = "info", stream=None) -> None:
    set_level(level)
    structlog.configure(
        processors=[
            _filter_level,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}")
    _state["level"] = _LEVELS[level]


def get_level() -> str:
    return next(k for k, v in _LEVELS.items() if v == _state["level"])


def get(name: str = "nanorix-agent", **bind):
    return structlog.get_logger(name).bind(**bind)
