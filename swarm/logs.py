"""Loggers for swarmcache, with one level setting for all of them (``--log-level``).

Every module logs through :func:`logger`, whose events pass a shared level filter before
reaching the global log publisher, so the operator's level applies to swarmcache's own
events without touching how twistd or the embedding application set up logging.
:func:`json_observer` writes every event as one JSON object a line (``--log-format
json``), for log shippers.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = ("debug", "info", "warn", "error", "critical")
FORMATS = ("text", "json")


def logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    """Emit swarmcache events at ``level`` and above (one of :data:`LEVELS`)."""
    _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(level))


def event_as_json(event: dict) -> str:
    """One line for a shipper: ``time`` (ISO 8601, UTC), ``level``, ``namespace``,
    ``message`` (formatted), the traceback of a ``failure`` if any, and the event's
    own fields (``peer``, ``node``...), each as JSON or else as its str()."""
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
            timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["failure"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key != "format":
            line.setdefault(key, _plain(value))  # never in place of the fields above
    return json.dumps(line, ensure_ascii=False) + "\n"


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def json_observer(stream: IO[str]) -> FileLogObserver:
    """Writes each event to ``stream`` as :func:`event_as_json` does."""
    return FileLogObserver(stream, event_as_json)
