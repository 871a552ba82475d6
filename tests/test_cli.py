"""Tests for swarm.cli: the swarmcache command, run in-process against a real node."""

from __future__ import annotations

import io
import json
import socket

import pytest
import pytest_twisted
from twisted.internet import threads

from swarm import cli


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return f"<exit {self.code} out={self.out!r} err={self.err!r}>"


async def swarmcache(*argv: str, url: str | None = None, stdin: bytes = b"") -> Result:
    """Run the command in a thread (it blocks), while the node serves in the reactor."""
    stdout, stderr = io.StringIO(), io.StringIO()
    args = (["--url", url] if url else []) + list(argv)
    code = await threads.deferToThread(cli.run, args, stdout, stderr, io.BytesIO(stdin))
    return Result(code, stdout.getvalue(), stderr.getvalue())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_ping(node):
    r = await swarmcache("ping", url=node.url)
    assert (r.code, r.out, r.err) == (0, f"{node.node_id}\n", "")


@pytest_twisted.ensureDeferred
async def test_set_then_get_a_string(node):
    r = await swarmcache("set", "greeting", "hello world", url=node.url)
    assert (r.code, r.out) == (0, "stored\n")
    r = await swarmcache("get", "greeting", url=node.url)
    assert (r.code, r.out, r.err) == (0, "hello world\n", "")


@pytest_twisted.ensureDeferred
async def test_values_are_typed_as_json_reads_them_else_strings(node):
    for text, stored in [("42", 42), ("-1.5", -1.5), ("true", True), ("null", None),
                         ("[1, \"a\"]", [1, "a"]), ('{"a": 1}', {"a": 1}),
                         ('"42"', "42"), ("hello world", "hello world"), ("1e999", "1e999"),
                         ("{nope", "{nope"), ("", "")]:
        assert (await swarmcache("set", "v", text, url=node.url)).code == 0
        assert (await node.get("v")) == stored, text
    await swarmcache("set", "plain", "42", "--string", url=node.url)
    assert (await node.get("plain")) == "42"
    r = await swarmcache("get", "plain", url=node.url)
    assert r.out == "42\n"  # a string, printed raw
    r = await swarmcache("set", "typed", '{"n": [1, 2.5, null]}', "--json-value", url=node.url)
    assert r.code == 0
    assert (await node.get("typed")) == {"n": [1, 2.5, None]}
    r = await swarmcache("get", "typed", url=node.url)
    assert json.loads(r.out) == {"n": [1, 2.5, None]}
    await swarmcache("set", "num", "42", "--json-value", url=node.url)
    assert (await node.get("num")) == 42
    r = await swarmcache("set", "broken", "{nope", "--json-value", url=node.url)
    assert r.code == 2 and "JSON" in r.err and r.out == ""


@pytest_twisted.ensureDeferred
async def test_get_missing_exits_1(node):
    r = await swarmcache("get", "missing", url=node.url)
    assert (r.code, r.out, r.err) == (1, "", "")


@pytest_twisted.ensureDeferred
async def test_delete_and_exists(node):
    await swarmcache("set", "k", "v", url=node.url)
    r = await swarmcache("exists", "k", url=node.url)
    assert (r.code, r.out) == (0, "true\n")
    r = await swarmcache("delete", "k", url=node.url)
    assert (r.code, r.out) == (0, "deleted\n")
    r = await swarmcache("delete", "k", url=node.url)
    assert r.code == 1
    r = await swarmcache("exists", "k", url=node.url)
    assert (r.code, r.out) == (1, "false\n")


@pytest_twisted.ensureDeferred
async def test_ttl_and_expire(node):
    await swarmcache("set", "k", "v", url=node.url)
    r = await swarmcache("ttl", "k", url=node.url)
    assert (r.code, r.out) == (0, "no expiry\n")
    r = await swarmcache("expire", "k", "100", url=node.url)
    assert (r.code, r.out) == (0, "updated\n")
    r = await swarmcache("ttl", "k", url=node.url)
    assert r.code == 0 and 0 < float(r.out) <= 100
    r = await swarmcache("expire", "k", "none", url=node.url)
    assert r.code == 0
    r = await swarmcache("ttl", "k", url=node.url)
    assert r.out == "no expiry\n"
    r = await swarmcache("ttl", "missing", url=node.url)
    assert r.code == 1
    r = await swarmcache("expire", "missing", "5", url=node.url)
    assert r.code == 1
    r = await swarmcache("set", "t", "v", "--ttl", "50", url=node.url)
    assert r.code == 0
    found, left = await node.ttl("t")
    assert found and 0 < left <= 50


@pytest_twisted.ensureDeferred
async def test_nx_and_xx(node):
    r = await swarmcache("set", "k", "a", "--xx", url=node.url)
    assert (r.code, r.out) == (1, "not stored\n")
    r = await swarmcache("set", "k", "a", "--nx", url=node.url)
    assert (r.code, r.out) == (0, "stored\n")
    r = await swarmcache("set", "k", "b", "--nx", url=node.url)
    assert (r.code, r.out) == (1, "not stored\n")
    r = await swarmcache("get", "k", url=node.url)
    assert r.out == "a\n"
    r = await swarmcache("set", "k", "c", "--nx", "--xx", url=node.url)
    assert r.code == 2 and "not allowed" in r.err


@pytest_twisted.ensureDeferred
async def test_incr(node):
    r = await swarmcache("incr", "n", url=node.url)
    assert (r.code, r.out) == (0, "1\n")
    r = await swarmcache("incr", "n", "10", url=node.url)
    assert r.out == "11\n"
    r = await swarmcache("incr", "n", "-3", url=node.url)
    assert r.out == "8\n"
    await swarmcache("set", "s", "text", url=node.url)
    r = await swarmcache("incr", "s", url=node.url)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("swarmcache: not_integer") and r.err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_mget(node):
    await swarmcache("set", "a", "1", url=node.url)
    await swarmcache("set", "b", "[1]", "--json-value", url=node.url)
    r = await swarmcache("mget", "a", "b", "missing", url=node.url)
    assert r.code == 0
    assert sorted(r.out.splitlines()) == ["a\t1", "b\t[1]"]


@pytest_twisted.ensureDeferred
async def test_stats(node):
    r = await swarmcache("stats", url=node.url)
    assert r.code == 0
    lines = dict(line.split(": ", 1) for line in r.out.splitlines())
    assert lines["node"] == node.node_id
    for field in ("keys", "memory_bytes", "hits", "misses", "uptime_s", "peers"):
        assert field in lines


@pytest_twisted.ensureDeferred
async def test_nodes_and_owner(node):
    r = await swarmcache("nodes", url=node.url)
    assert r.code == 0
    lines = r.out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{node.node_id} (self)")
    assert "hops=0" in lines[0] and "neighbors" in lines[0]
    r = await swarmcache("owner", "some-key", url=node.url)
    assert (r.code, r.out) == (0, f"{node.node_id}\n")


@pytest_twisted.ensureDeferred
async def test_json_output_is_the_whole_reply(node):
    r = await swarmcache("--json", "set", "k", "v", url=node.url)
    assert r.code == 0
    reply = json.loads(r.out)
    assert reply["ok"] is True and reply["stored"] is True and "id" in reply
    r = await swarmcache("--json", "get", "k", url=node.url)
    assert json.loads(r.out)["value"] == "v"
    assert r.out.count("\n") == 1
    r = await swarmcache("--json", "get", "missing", url=node.url)
    assert r.code == 1
    assert json.loads(r.out) == {"id": json.loads(r.out)["id"], "ok": True,
                                 "found": False, "value": None}
    r = await swarmcache("--json", "nodes", url=node.url)
    reply = json.loads(r.out)
    assert reply["self"] == node.node_id and reply["nodes"][0]["id"] == node.node_id
    r = await swarmcache("--json", "stats", url=node.url)
    assert json.loads(r.out)["stats"]["node"] == node.node_id


@pytest_twisted.ensureDeferred
async def test_bytes_values_print_as_base64_json(node):
    await node.set("blob", b"\x00\xff")
    r = await swarmcache("get", "blob", url=node.url)
    assert r.code == 0 and json.loads(r.out) == {"$base64": "AP8="}


@pytest_twisted.ensureDeferred
async def test_error_reply_exits_2(node):
    r = await swarmcache("set", "k", "v", "--ttl", "-1", url=node.url)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith("swarmcache: bad_request")


@pytest_twisted.ensureDeferred
async def test_unreachable_node_exits_2():
    url = f"ws://127.0.0.1:{_closed_port()}"
    r = await swarmcache("--timeout", "5", "get", "k", url=url)
    assert r.code == 2 and r.out == ""
    assert r.err.startswith(f"swarmcache: unavailable: cannot connect to {url}")
    assert r.err.count("\n") == 1


@pytest_twisted.ensureDeferred
async def test_bad_url_exits_2():
    r = await swarmcache("ping", url="http://127.0.0.1:1")
    assert r.code == 2 and "cannot connect" in r.err


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["get"],
    ["incr", "k", "one"],
    ["expire", "k", "soon"],
    ["--timeout", "x", "ping"],
])
@pytest_twisted.ensureDeferred
async def test_bad_usage_exits_2(argv):
    r = await swarmcache(*argv, url="ws://127.0.0.1:1")
    assert r.code == 2 and r.out == ""
    assert "error:" in r.err


@pytest_twisted.ensureDeferred
async def test_help_exits_0():
    r = await swarmcache("--help")
    assert r.code == 0 and "COMMAND" in r.out and r.err == ""


@pytest_twisted.ensureDeferred
async def test_url_defaults_to_the_environment(node, monkeypatch):
    monkeypatch.setenv("SWARMCACHE_URL", node.url)
    r = await swarmcache("ping")
    assert (r.code, r.out) == (0, f"{node.node_id}\n")


def test_default_url_without_environment(monkeypatch):
    monkeypatch.delenv("SWARMCACHE_URL", raising=False)
    parser = cli.build_parser(io.StringIO(), io.StringIO())
    assert parser.parse_args(["ping"]).url == "ws://127.0.0.1:8765"


@pytest_twisted.ensureDeferred
async def test_set_n_5_then_incr_n(node):
    await swarmcache("set", "n", "5", url=node.url)
    r = await swarmcache("incr", "n", url=node.url)
    assert (r.code, r.out) == (0, "6\n")


@pytest_twisted.ensureDeferred
async def test_value_from_stdin_or_a_file_as_it_is(node, tmp_path):
    big = "x" * (512 * 1024)  # far past what an argument list takes
    r = await swarmcache("set", "big", "-", url=node.url, stdin=big.encode())
    assert r.code == 0 and (await node.get("big")) == big
    path = tmp_path / "v.json"
    path.write_bytes(b'{"a": [1, 2]}\n')
    await swarmcache("set", "f", "--file", str(path), url=node.url)
    assert (await node.get("f")) == '{"a": [1, 2]}\n'  # a file's text is kept as it is
    await swarmcache("set", "j", "--file", str(path), "--json-value", url=node.url)
    assert (await node.get("j")) == {"a": [1, 2]}
    path.write_bytes(b"\xff\x00binary")
    await swarmcache("set", "b", "--file", str(path), url=node.url)
    assert (await node.get("b")) == b"\xff\x00binary"
    r = await swarmcache("set", "k", url=node.url)
    assert r.code == 2 and "needs a VALUE" in r.err
    r = await swarmcache("set", "k", "v", "--file", str(path), url=node.url)
    assert r.code == 2 and "not both" in r.err
    r = await swarmcache("set", "k", "--file", str(tmp_path / "absent"), url=node.url)
    assert r.code == 2 and "cannot read" in r.err


@pytest_twisted.ensureDeferred
async def test_flags_after_the_command(node):
    await node.set("k", "v")
    r = await swarmcache("get", "k", "--json", "--url", node.url)
    assert r.code == 0 and json.loads(r.out)["value"] == "v"
    r = await swarmcache("--url", "ws://127.0.0.1:1", "get", "k", "--url", node.url)
    assert r.code == 0 and r.out == "v\n"  # the later one wins
    r = await swarmcache("--json", "get", "k", url=node.url)  # before still works
    assert json.loads(r.out)["found"] is True


@pytest_twisted.ensureDeferred
async def test_version():
    import swarm

    r = await swarmcache("--version")
    assert (r.code, r.out) == (0, f"swarmcache {swarm.__version__}\n")


@pytest_twisted.ensureDeferred
async def test_mset_mget_del_keys_scan_flush(node):
    r = await swarmcache("mset", "a", "1", "b", "[2]", "c", "three", url=node.url)
    assert (r.code, r.out) == (0, "stored 3\n")
    assert await node.mget(["a", "b", "c"]) == {"a": 1, "b": [2], "c": "three"}
    r = await swarmcache("mset", "a", url=node.url)
    assert r.code == 2 and "value is missing" in r.err
    await node.mset({f"user:{i}": i for i in range(30)})
    r = await swarmcache("keys", "user:1*", url=node.url)
    assert sorted(r.out.split()) == sorted(["user:1"] + [f"user:1{i}" for i in range(10)])
    r = await swarmcache("keys", url=node.url)
    assert len(r.out.split()) == 33
    r = await swarmcache("scan", "--count", "5", url=node.url)
    cursor, *keys = r.out.splitlines()
    assert cursor and len(keys) == 5
    r = await swarmcache("scan", "--cursor", cursor, "--count", "100", url=node.url)
    assert r.out.splitlines()[0] == "" and len(r.out.splitlines()) == 1 + 28
    r = await swarmcache("del", "a", "b", "nope", url=node.url)
    assert (r.code, r.out) == (0, "2\n")
    r = await swarmcache("del", "nope", url=node.url)
    assert (r.code, r.out) == (1, "0\n")
    r = await swarmcache("flush", url=node.url)
    assert r.code == 2 and "--yes" in r.err
    assert (await node.stats())["keys"] == 31
    r = await swarmcache("flush", "--yes", url=node.url)
    assert (r.code, r.out) == (0, "flushed 31\n")


@pytest_twisted.ensureDeferred
async def test_token_option_and_environment(tmp_path, monkeypatch):
    from conftest import start_node

    path = tmp_path / "tokens"
    path.write_text("reader\nroot admin\n")
    n = await start_node(node_id="t", client_token_file=str(path))
    try:
        r = await swarmcache("ping", url=n.url)
        assert r.code == 2 and "401" in r.err
        r = await swarmcache("ping", "--token", "reader", url=n.url)
        assert (r.code, r.out) == (0, "t\n")
        r = await swarmcache("flush", "--yes", "--token", "reader", url=n.url)
        assert r.code == 2 and "unauthorized" in r.err
        monkeypatch.setenv("SWARMCACHE_TOKEN", "root")
        r = await swarmcache("flush", "--yes", url=n.url)
        assert (r.code, r.out) == (0, "flushed 0\n")
    finally:
        await n.stopService()
