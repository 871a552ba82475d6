"""The protocol's error codes as exceptions, shared by the node and the client.

A handler raises one of these; the wire layer turns it into an error reply, and the
client turns an error reply back into the same class, so both sides speak in codes.
"""

from __future__ import annotations


class SwarmError(Exception):
    """An error with a protocol error code."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequest(SwarmError):
    code = "bad_request"


class UnknownOp(SwarmError):
    code = "unknown_op"


class TooLarge(SwarmError):
    code = "too_large"


class NotInteger(SwarmError):
    code = "not_integer"


class Timeout(SwarmError):
    code = "timeout"


class Unavailable(SwarmError):
    code = "unavailable"


class Unauthorized(SwarmError):
    code = "unauthorized"


class Overloaded(SwarmError):
    code = "overloaded"


class InternalError(SwarmError):
    code = "internal"


ERRORS_BY_CODE: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        TooLarge,
        NotInteger,
        Timeout,
        Unavailable,
        Unauthorized,
        Overloaded,
        InternalError,
    )
}


def error_from_wire(error: object) -> SwarmError:
    """The exception for an error object from a reply; unknown codes stay readable."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error object: {error!r}")
    code = error.get("code")
    message = str(error.get("message") or code)
    cls = ERRORS_BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        exc = SwarmError(message)
        exc.code = str(code)
        return exc
    return cls(message)
