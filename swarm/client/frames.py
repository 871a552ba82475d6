"""What every Python client does with frames, without any I/O or event loop.

The Twisted client (:mod:`swarm.client.connection`), the asyncio client
(:mod:`swarm.client.aio`) and the blocking one (:mod:`swarm.client.blocking`) share it,
so they cut batches, read replies and raise errors alike. Nothing here imports Twisted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from swarm.errors import SwarmError, Unauthorized, Unavailable, error_from_wire
from swarm.protocol.wire import decode_frame

#: The largest frame a client accepts from a node: generous, but bounded so a broken
#: node cannot make the client buffer without limit.
MAX_PAYLOAD = 64 * 1024 * 1024

ENCODINGS = {"cbor": True, "json": False}  # encoding -> frames are binary

#: Requests queued in one turn leave in frames of at most AUTOBATCH_COUNT requests and
#: about AUTOBATCH_BYTES: below the 64 KiB from which a node scans a frame before it
#: decodes it, and far below any node's frame and batch limits (defaults 4 MiB and
#: 10,000), so batching never makes a frame a node refuses that the requests alone
#: would not be. A request larger than that goes in a frame of its own.
AUTOBATCH_BYTES = 60 * 1024
AUTOBATCH_COUNT = 1024

T = TypeVar("T")


class ConnectionClosed(Unavailable):
    """The connection closed (or was closed) before the reply arrived."""


def binary_for(encoding: str) -> bool:
    """Whether ``encoding``'s frames are binary; ValueError for an unknown one."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be 'cbor' or 'json', not {encoding!r}")
    return ENCODINGS[encoding]


def autobatches(items: Iterable[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """Cut queued requests (in order) into the frames they leave in (see AUTOBATCH_*)."""
    chunk: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if chunk and (total + n > AUTOBATCH_BYTES or len(chunk) == AUTOBATCH_COUNT):
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += n
    if chunk:
        yield chunk


def check_reply(reply: dict) -> dict:
    """The reply if it is a success; else raise the SwarmError it carries."""
    if reply.get("ok") is True:
        return reply
    raise error_from_wire(reply.get("error"))


def replies_in(payload: bytes, is_binary: bool,
               warn: Callable[[str], None]) -> list[tuple[int, dict]]:
    """The ``(id, reply)`` pairs of one frame from a node. What no request could be
    waiting for (undecodable, not an object, no integer id) is reported to ``warn`` and
    left out, so a confused node cannot break the client's reader."""
    try:
        decoded = decode_frame(payload, is_binary)
    except SwarmError as e:
        warn(f"dropped a frame the client cannot decode: {e.message}")
        return []
    found = []
    for reply in decoded if isinstance(decoded, list) else [decoded]:
        if not isinstance(reply, dict):
            warn(f"dropped a reply that is not an object: {reply!r}")
            continue
        rid = reply.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            found.append((rid, reply))
        elif rid is None and reply.get("ok") is False:
            warn(f"node reported an error for no request: {reply.get('error')!r}")
        else:
            warn(f"dropped a reply with an id no request has: {rid!r}")
    return found


def request_frame(rid: int, op: str, args: dict[str, Any]) -> dict:
    """The request object ``{"id", "op", **args}``."""
    frame = {"id": rid, "op": op}
    frame.update(args)
    return frame


def handshake_error(url: str, e: Exception) -> SwarmError:
    """What a failed dial or upgrade is raised as: Unauthorized for a refused token
    (HTTP 401/403), Unavailable otherwise."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return Unauthorized(f"{url} refused the connection: HTTP {status} "
                            "(missing or wrong client token?)")
    text = str(e) or type(e).__name__
    return Unavailable(f"cannot connect to {url}: {text}")


def auth_headers(token: str | None) -> dict[str, str]:
    """The upgrade's headers: ``Authorization: Bearer`` when there is a token."""
    return {"Authorization": f"Bearer {token}"} if token else {}
