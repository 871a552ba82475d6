"""A node's local storage: the :class:`IStore` interface and the default in-memory store."""

from swarm.store.interface import IStore
from swarm.store.memory import MemoryStore

__all__ = ["IStore", "MemoryStore"]
