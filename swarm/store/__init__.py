"""A node's local storage: the :class:`IStore` interface and the default in-memory store."""

from swarm.store.memory import IStore, MemoryStore

__all__ = ["IStore", "MemoryStore"]
