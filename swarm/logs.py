"""Loggers for swarmcache, with one level setting for all of them (``--log-level``).

Every module logs through :func:`logger`, whose events pass a shared level filter before
reaching the global log publisher, so the operator's level applies to swarmcache's own
events without touching how twistd or the embedding application set up logging.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = ("debug", "info", "warn", "error", "critical")


def logger(namespace: str) -> Logger:
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    """Emit swarmcache events at ``level`` and above (one of :data:`LEVELS`)."""
    _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(level))
