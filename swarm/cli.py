"""The ``swarmcache`` command: requests to a node, the answer on stdout.

Exit status: 0 success; 1 when the answer is "no" (get finds nothing, delete or del
deleted nothing, exists is false, ttl finds no key, expire updated nothing, set
--nx/--xx stored nothing); 2 for any error, with a one-line message on stderr.
``--json`` prints the whole reply as one JSON line for scripts.

It runs on the blocking client (:mod:`swarm.client.blocking`), which needs neither
Twisted nor Autobahn, so a call starts in a fraction of the time a reactor takes.
:func:`run` does all the work with injected streams, so tests call it in-process
(from a thread, while the node runs in the reactor); :func:`main` is the console script.

Values on the command line are typed (see :func:`typed_value`): ``set n 5`` stores the
integer 5, so ``incr n`` works, as in Redis; ``--string`` keeps a value a string.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
from typing import Any, BinaryIO, Callable, NoReturn, TextIO

import swarm
from swarm.errors import SwarmError
from swarm.protocol.ops import CLIENT_OPS

DEFAULT_URL = "ws://127.0.0.1:8765"

OK, NO, ERROR = 0, 1, 2

#: How many keys ``keys`` asks for per scan step.
KEYS_STEP = 1000


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

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:  # --version writes to sys.stdout itself: to the injected streams
            streams = {None: self._stdout, sys.stdout: self._stdout, sys.stderr: self._stderr}
            streams.get(file, file).write(message)

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


def typed_value(text: str) -> Any:
    """A command-line value as the cache should hold it: what it reads as in JSON (an
    integer, a float, true, false, null, an array, an object, a "quoted string"), and
    anything else, such as ``hello world``, as that string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text  # 1e999: JSON reads infinity, which no value may hold
    return value


def _options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name. On the commands,
    their defaults are left out, so that one given before the command is kept."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--url", default=default(os.environ.get("SWARMCACHE_URL") or DEFAULT_URL),
        help="the node's WebSocket URL (default: $SWARMCACHE_URL or %s)" % DEFAULT_URL,
    )
    parser.add_argument(
        "--token", default=default(os.environ.get("SWARMCACHE_TOKEN")),
        help="the client token, when the node asks for one (default: $SWARMCACHE_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the whole reply as JSON")
    parser.add_argument(
        "--timeout", type=float, default=default(10.0), metavar="S",
        help="seconds to wait for the connection and the reply (default: 10)",
    )


def build_parser(stdout: TextIO, stderr: TextIO) -> argparse.ArgumentParser:
    top = _Parser(prog="swarmcache", description="Talk to a swarmcache node.",
                  stdout=stdout, stderr=stderr)
    top.add_argument("--version", action="version", version=f"swarmcache {swarm.__version__}")
    _options(top, suppress=False)
    commands = top.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(name: str, summary: str | None = None) -> _Parser:
        """A subcommand, described as the op table describes its op."""
        p = commands.add_parser(name, help=summary or CLIENT_OPS[name].summary,
                                stdout=stdout, stderr=stderr)
        _options(p, suppress=True)
        return p

    command("ping")
    command("get").add_argument("key")
    p = command("set")
    p.add_argument("key")
    p.add_argument("value", nargs="?",
                   help="the value (typed: 5 is a number, [1,2] an array, hello a string); "
                        "'-' reads it from stdin")
    p.add_argument("--file", metavar="PATH", help="read the value from PATH")
    p.add_argument("--ttl", type=float, metavar="S", help="expire after S seconds")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--nx", action="store_true", help="only if the key is absent")
    only.add_argument("--xx", action="store_true", help="only if the key is present")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--string", action="store_true", help="store VALUE as a string, untyped")
    kind.add_argument("--json-value", action="store_true",
                      help="VALUE must be JSON (an error otherwise)")
    command("delete").add_argument("key")
    command("del", "delete keys; how many existed").add_argument("keys", nargs="+",
                                                                  metavar="KEY")
    command("exists").add_argument("key")
    p = command("expire")
    p.add_argument("key")
    p.add_argument("ttl", type=_ttl_or_none, metavar="TTL", help="seconds, or 'none'")
    command("ttl").add_argument("key")
    p = command("incr")
    p.add_argument("key")
    p.add_argument("delta", type=int, nargs="?", default=1)
    command("mget").add_argument("keys", nargs="+", metavar="KEY")
    p = command("mset", "store several values: KEY VALUE [KEY VALUE ...], typed as set's")
    p.add_argument("pairs", nargs="+", metavar="KEY VALUE")
    p.add_argument("--ttl", type=float, metavar="S", help="expire after S seconds")
    p = command("scan", "one step of a scan: the next cursor (empty when done), then keys")
    p.add_argument("--cursor", help="the cursor the previous step printed")
    p.add_argument("--match", metavar="PATTERN", help="only keys matching this glob")
    p.add_argument("--count", type=int, metavar="N", help="about this many keys (hint)")
    command("keys", "every key matching a glob (a whole scan)").add_argument(
        "pattern", nargs="?", default="*", metavar="PATTERN")
    command("flush").add_argument("--yes", action="store_true", required=True,
                                  help="yes, remove every entry in the swarm")
    command("stats").add_argument("--node", help="another node's counters, through the swarm")
    command("nodes")
    command("owner").add_argument("key")
    return top


class _BadValue(Exception):
    pass


def _value(args: argparse.Namespace, stdin: BinaryIO) -> Any:
    """set's value: from the command line (typed), stdin or a file (as they are)."""
    if args.file is not None and args.value is not None:
        raise _BadValue("give VALUE or --file, not both")
    if args.file is None and args.value is None:
        raise _BadValue("set needs a VALUE, '-' for stdin, or --file PATH")
    if args.file is not None or args.value == "-":
        try:
            if args.file is not None:
                with open(args.file, "rb") as f:
                    raw = f.read()
            else:
                raw = stdin.read()
        except OSError as e:
            raise _BadValue(f"cannot read {args.file}: {e.strerror or e}") from None
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # not text: stored as bytes
        if args.json_value:
            if text is None:
                raise _BadValue("the value is not UTF-8 text, so not JSON")
            return _strict_json(text)
        return raw if text is None else text
    if args.json_value:
        return _strict_json(args.value)
    return args.value if args.string else typed_value(args.value)


def _strict_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise _BadValue(f"VALUE is not valid JSON: {e}") from None


def _request(args: argparse.Namespace, stdin: BinaryIO) -> tuple[str, dict]:
    """The op and arguments for the parsed command line."""
    cmd = args.command
    if cmd in ("ping", "nodes", "flush"):
        return cmd, {}
    if cmd == "stats":
        return cmd, {} if args.node is None else {"node": args.node}
    if cmd == "set":
        request = {"key": args.key, "value": _value(args, stdin)}
        if args.ttl is not None:
            request["ttl"] = args.ttl
        if args.nx:
            request["nx"] = True
        if args.xx:
            request["xx"] = True
        return cmd, request
    if cmd == "mset":
        if len(args.pairs) % 2:
            raise _BadValue("mset takes KEY VALUE pairs: a value is missing")
        items = {k: typed_value(v) for k, v in zip(args.pairs[::2], args.pairs[1::2])}
        return cmd, {"items": items} if args.ttl is None else {"items": items, "ttl": args.ttl}
    if cmd == "expire":
        return cmd, {"key": args.key, "ttl": args.ttl}
    if cmd == "incr":
        return cmd, {"key": args.key, "delta": args.delta}
    if cmd == "mget":
        return cmd, {"keys": args.keys}
    if cmd == "del":
        return "mdelete", {"keys": args.keys}
    if cmd == "scan":
        request = {name: getattr(args, name) for name in ("cursor", "match", "count")
                   if getattr(args, name) is not None}
        return cmd, request
    if cmd == "keys":
        return "scan", {"match": args.pattern, "count": KEYS_STEP}
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
    "del": lambda r: ([str(r["deleted"])], OK if r.get("deleted") else NO),
    "exists": lambda r: (["true"], OK) if r.get("exists") else (["false"], NO),
    "expire": lambda r: (["updated"], OK) if r.get("updated") else (["not found"], NO),
    "ttl": lambda r: (_show_ttl(r), OK if r.get("found") else NO),
    "incr": lambda r: ([str(r["value"])], OK),
    "mget": lambda r: (
        [f"{k}\t{_value_text(v)}" for k, v in (r.get("values") or {}).items()], OK
    ),
    "mset": lambda r: ([f"stored {r['stored']}"], OK),
    "scan": lambda r: ([r.get("cursor") or "", *r.get("keys", [])], OK),
    "keys": lambda r: (list(r.get("keys", [])), OK),
    "flush": lambda r: ([f"flushed {r['flushed']}"], OK),
    "stats": lambda r: (
        [f"{k}: {_value_text(v)}" for k, v in sorted((r.get("stats") or {}).items())], OK
    ),
    "nodes": lambda r: (_show_nodes(r), OK),
    "owner": lambda r: ([str(n) for n in r.get("nodes") or []], OK),
}


# -- running -----------------------------------------------------------------------------


def run(argv: list[str], stdout: TextIO, stderr: TextIO,
        stdin: BinaryIO | None = None) -> int:
    """Run one command line; the exit status. Never raises (but SystemExit for none)."""

    def complain(message: str) -> int:
        stderr.write(f"swarmcache: {message}\n")
        return ERROR

    parser = build_parser(stdout, stderr)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ERROR
    try:
        op, request = _request(args, stdin if stdin is not None else sys.stdin.buffer)
    except _BadValue as e:
        return complain(str(e))

    from swarm.client.blocking import BlockingSwarmClient  # after parsing: --help is quick

    try:
        client = BlockingSwarmClient(args.url, timeout=args.timeout,
                                     connect_timeout=args.timeout, token=args.token,
                                     pool_size=1)
    except Exception as e:  # a URL that is not ws:// or wss://, and the like
        return complain(f"cannot connect to {args.url}: {e}")
    try:
        with client:
            return _answer(args, op, request, client, stdout)
    except SwarmError as e:
        return complain(f"{e.code}: {e.message}")
    except Exception as e:
        return complain(f"cannot reach {args.url}: {type(e).__name__}: {e}")


def _answer(args: argparse.Namespace, op: str, request: dict, client: Any,
            stdout: TextIO) -> int:
    if args.command == "keys":  # every step, printed as it comes
        status = OK
        while True:
            reply = client.request(op, **request)
            status = _print(args, reply, stdout)
            if reply.get("cursor") is None:
                return status
            request["cursor"] = reply["cursor"]
    return _print(args, client.request(op, **request), stdout)


def _print(args: argparse.Namespace, reply: dict, stdout: TextIO) -> int:
    lines, status = _SHOW[args.command](reply)
    if args.json:
        stdout.write(_json(reply) + "\n")
        return status
    for line in lines:
        stdout.write(line + "\n")
    stdout.flush()
    return status


def main() -> NoReturn:
    """The ``swarmcache`` console script."""
    sys.exit(run(sys.argv[1:], sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
