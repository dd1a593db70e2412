"""structlog set-up: JSON lines off a terminal, readable text on one."""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from typing import Any

import structlog

PHI_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date"})


def _redact_phi(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in PHI_KEYS & event.keys():
        event[name] = "***"
    return event


def configure(
    level: str = "info", fmt: str = "auto", phi: bool = False, node: str = "", worker: int | None = None
) -> None:
    """Route structlog and the standard library (pynetdicom, alembic) through one renderer;
    with `node`, every line says which daemon wrote it, and with `worker`, which of its processes."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def add_node(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("node", node)
        if worker is not None:
            event.setdefault("worker", worker)
        return event

    shared: list[Any] = [
        *([add_node] if node else []),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not phi:
        shared.append(_redact_phi)
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # A line below the level is dropped before the time is stamped: one per C-STORE adds up.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # These libraries narrate every PDU, migration step and codec tile at INFO; their warnings
    # and errors are what an operator needs.
    for chatty in ("pynetdicom", "alembic", "openjpeg", "pylibjpeg", "faker"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def bind_context(**values: Any) -> None:
    """Every later event of this thread, the libraries' included, carries `values`. pynetdicom
    gives each association threads of its own, so binding there names the association."""
    structlog.contextvars.bind_contextvars(**values)


def in_context(**values: Any) -> AbstractContextManager[None]:
    """The events inside the block carry `values`; those after it no longer do."""
    return structlog.contextvars.bound_contextvars(**values)
