"""The ``swarmcache`` command: one request to a node, the answer on stdout.

Exit status: 0 success; 1 when the answer is "no" (get finds nothing, delete deleted
nothing, exists is false, ttl finds no key, expire updated nothing, set --nx/--xx stored
nothing); 2 for any error, with
a one-line message on stderr. ``--json`` prints the whole reply as one JSON line for
scripts. :func:`run` does all the work against an injected reactor so tests call it
in-process; :func:`main` is the console script.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any, Callable, NoReturn, TextIO

from twisted.internet.defer import Deferred, ensureDeferred

from swarm.client.connection import SwarmClient
from swarm.errors import SwarmError, Unavailable
from swarm.protocol.ops import CLIENT_OPS

DEFAULT_URL = "ws://127.0.0.1:8765"

OK, NO, ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that writes to the given streams instead of sys.stdout/stderr."""

    def __init__(self, *args: Any, stdout: TextIO, stderr: TextIO, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stdout = stdout
        self._stderr = stderr

    def print_usage(self, file: TextIO | None = None) -> None:
        super().print_usage(file or self._stdout)

    def print_help(self, file: TextIO | None = None) -> None:
        super().print_help(file or self._stdout)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._stderr.write(message)
        raise SystemExit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(self._stderr)
        self.exit(ERROR, f"{self.prog}: error: {message}\n")


def _ttl_or_none(text: str) -> float | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"TTL must be a number of seconds or 'none', not {text!r}"
        ) from None


def build_parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    def parser(**kwargs: Any) -> _Parser:
        return _Parser(stdout=stdout, stderr=stderr, **kwargs)

    top = parser(
        prog="swarmcache",
        description="Talk to a swarmcache node.",
    )
    top.add_argument(
        "--url",
        default=os.environ.get("SWARMCACHE_URL") or DEFAULT_URL,
        help="the node's WebSocket URL (default: $SWARMCACHE_URL or %(default)s)",
    )
    top.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    top.add_argument(
        "--timeout", type=float, default=10.0, metavar="S",
        help="seconds to wait for the connection and the reply (default: %(default)s)",
    )
    commands = top.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(name: str) -> _Parser:
        """A subcommand for one op of the table, described as the table describes it."""
        return commands.add_parser(name, help=CLIENT_OPS[name].summary, stdout=stdout,
                                   stderr=stderr)

    command("ping")
    command("get").add_argument("key")
    p = command("set")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--ttl", type=float, metavar="S", help="expire after S seconds")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--nx", action="store_true", help="only if the key is absent")
    only.add_argument("--xx", action="store_true", help="only if the key is present")
    p.add_argument("--json-value", action="store_true", help="VALUE is JSON, not a string")
    command("delete").add_argument("key")
    command("exists").add_argument("key")
    p = command("expire")
    p.add_argument("key")
    p.add_argument("ttl", type=_ttl_or_none, metavar="TTL", help="seconds, or 'none'")
    command("ttl").add_argument("key")
    p = command("incr")
    p.add_argument("key")
    p.add_argument("delta", type=int, nargs="?", default=1)
    command("mget").add_argument("keys", nargs="+", metavar="KEY")
    command("stats")
    command("nodes")
    command("owner").add_argument("key")
    return top


class _BadValue(Exception):
    pass


def _request(args: argparse.Namespace) -> tuple[str, dict]:
    """The op and arguments for the parsed command line."""
    cmd = args.command
    if cmd in ("ping", "stats", "nodes"):
        return cmd, {}
    if cmd == "set":
        value: Any = args.value
        if args.json_value:
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _BadValue(f"VALUE is not valid JSON: {e}") from None
        request = {"key": args.key, "value": value}
        if args.ttl is not None:
            request["ttl"] = args.ttl
        if args.nx:
            request["nx"] = True
        if args.xx:
            request["xx"] = True
        return cmd, request
    if cmd == "expire":
        return cmd, {"key": args.key, "ttl": args.ttl}
    if cmd == "incr":
        return cmd, {"key": args.key, "delta": args.delta}
    if cmd == "mget":
        return cmd, {"keys": args.keys}
    return cmd, {"key": args.key}


# -- output ------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return {"$base64": base64.b64encode(obj).decode("ascii")}
    raise TypeError(f"cannot print {type(obj).__name__} as JSON")


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default, sort_keys=True)


def _value_text(value: Any) -> str:
    """A string as it is; anything else as JSON."""
    return value if isinstance(value, str) else _json(value)


def _show_nodes(reply: dict) -> list[str]:
    me = reply.get("self")
    nodes = sorted(reply.get("nodes") or [], key=lambda n: (n.get("hops", 0), str(n.get("id"))))
    lines = []
    for n in nodes:
        neighbors = ", ".join(str(x) for x in n.get("neighbors") or []) or "-"
        mark = " (self)" if n.get("id") == me else ""
        lines.append(f"{n.get('id')}{mark}  hops={n.get('hops')}  neighbors: {neighbors}")
    return lines


def _show_ttl(reply: dict) -> list[str]:
    if not reply.get("found"):
        return ["not found"]
    ttl = reply.get("ttl")
    return ["no expiry" if ttl is None else f"{ttl:.3f}"]


# command -> (lines to print, exit status) from the reply
_SHOW: dict[str, Callable[[dict], tuple[list[str], int]]] = {
    "ping": lambda r: ([str(r["node"])], OK),
    "get": lambda r: ([_value_text(r.get("value"))], OK) if r.get("found") else ([], NO),
    "set": lambda r: (["stored"], OK) if r.get("stored") else (["not stored"], NO),
    "delete": lambda r: (["deleted"], OK) if r.get("deleted") else (["not found"], NO),
    "exists": lambda r: (["true"], OK) if r.get("exists") else (["false"], NO),
    "expire": lambda r: (["updated"], OK) if r.get("updated") else (["not found"], NO),
    "ttl": lambda r: (_show_ttl(r), OK if r.get("found") else NO),
    "incr": lambda r: ([str(r["value"])], OK),
    "mget": lambda r: (
        [f"{k}\t{_value_text(v)}" for k, v in (r.get("values") or {}).items()], OK
    ),
    "stats": lambda r: (
        [f"{k}: {_value_text(v)}" for k, v in sorted((r.get("stats") or {}).items())], OK
    ),
    "nodes": lambda r: (_show_nodes(r), OK),
    "owner": lambda r: ([str(n) for n in r.get("nodes") or []], OK),
}


def _status(command: str, reply: dict) -> int:
    return _SHOW[command](reply)[1]


# -- running -----------------------------------------------------------------------------


def run(reactor: Any, argv: list[str], stdout: TextIO, stderr: TextIO) -> Deferred[int]:
    """Run one command line; fires with the exit status. Never fails."""
    return ensureDeferred(_run(reactor, list(argv), stdout, stderr))


async def _run(reactor: Any, argv: list[str], stdout: TextIO, stderr: TextIO) -> int:
    def complain(message: str) -> int:
        stderr.write(f"swarmcache: {message}\n")
        return ERROR

    parser = build_parser(stdout, stderr)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ERROR
    try:
        op, request = _request(args)
    except _BadValue as e:
        return complain(str(e))

    try:
        client = await SwarmClient.connect(
            args.url, reactor=reactor, timeout=args.timeout, connect_timeout=args.timeout
        )
    except Unavailable as e:
        return complain(e.message)
    except Exception as e:  # a URL Autobahn cannot parse, and the like
        return complain(f"cannot connect to {args.url}: {e}")
    try:
        try:
            reply = await client.request(op, **request)
        except SwarmError as e:
            return complain(f"{e.code}: {e.message}")
        except Exception as e:
            return complain(f"{type(e).__name__}: {e}")
    finally:
        await client.close()

    if args.json:
        stdout.write(_json(reply) + "\n")
        return _status(args.command, reply)
    lines, status = _SHOW[args.command](reply)
    for line in lines:
        stdout.write(line + "\n")
    return status


def main() -> NoReturn:
    """The ``swarmcache`` console script."""
    from twisted.internet.task import react

    codes: list[int] = []

    def go(reactor: Any) -> Deferred[None]:
        return run(reactor, sys.argv[1:], sys.stdout, sys.stderr).addCallback(codes.append)

    try:
        react(go)
    except SystemExit:
        pass
    sys.exit(codes[0] if codes else ERROR)
