"""Open connections of a factory, so a stopping node can close them all and wait."""

from __future__ import annotations

from twisted.internet.defer import Deferred


class ConnectionTracker:
    """Knows a factory's open connections, so a stopping node can close them all."""

    def __init__(self) -> None:
        self.connections: set = set()
        self._waiting: list[Deferred] = []

    def opened(self, protocol) -> None:
        self.connections.add(protocol)

    def closed(self, protocol) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def when_all_closed(self) -> Deferred:
        d: Deferred = Deferred()
        if self.connections:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d
