"""``--log-format json`` under a real ``twistd``, and the start-up line that says where a
node listens, whom it dials and whether it is protected (issue 10)."""

from __future__ import annotations

import json
import signal

import pytest_twisted
from conftest import start_node as start_in_process
from twistd_support import Twistd, eventually, free_port, start_node
from twisted.logger import globalLogPublisher

from swarm.logs import event_as_json

STARTED = "listening: clients at"


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest_twisted.ensureDeferred
async def test_twistd_writes_one_json_object_a_line(tmp_path):
    metrics_port = free_port()
    t = start_node(tmp_path, "j1", "--log-format", "json",
                   "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1")
    try:
        async def started() -> bool:
            return STARTED in t.out_path.read_text()

        await eventually(started, "the start-up line", 10, t.describe)
        t.proc.send_signal(signal.SIGTERM)
        await t.exited()
        lines = json_lines(t.out_path.read_text())  # fails on any line that is not JSON
        assert len(lines) > 3
        for line in lines:
            assert {"time", "level", "namespace", "message"} <= line.keys(), line
        (up,) = [line for line in lines if STARTED in line["message"]]
        assert up["level"] == "info" and up["namespace"] == "swarm.node.node"
        assert up["node"] == "j1" and up["clients"] == t.url
        assert up["metrics"].endswith(f"127.0.0.1:{metrics_port}/metrics")
        assert (up["tokens"], up["secret"], up["dialing"]) == ("off", "off", "no one")
        assert any(line["message"] == "node j1 stopping" for line in lines)
    finally:
        t.kill()


def test_an_unknown_log_format_is_refused(tmp_path):
    t = Twistd(tmp_path, ["-n", "--pidfile=", "swarmcache", "--log-format", "xml"])
    try:
        assert t.wait() != 0
        assert "--log-format must be one of text, json" in t.output()
    finally:
        t.kill()


@pytest_twisted.ensureDeferred
async def test_the_start_up_line_says_a_node_is_protected(tmp_path):
    tokens, events = tmp_path / "tokens", []
    tokens.write_text("a-client-token-of-some-length\n")
    globalLogPublisher.addObserver(events.append)
    try:
        node = await start_in_process(
            node_id="p1", client_token_file=str(tokens), peer_secret=b"s" * 32,
            allowed_origins=["https://app.example"], peers=["ws://127.0.0.1:9"])

        async def said() -> bool:
            return any(STARTED in e.get("log_format", "") for e in events)

        try:
            await eventually(said, "the start-up line", 10)
        finally:
            await node.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    line = json.loads(event_as_json(next(e for e in events
                                         if STARTED in e.get("log_format", ""))))
    assert line["tokens"] == "on" and line["secret"] == "on"
    assert line["origins"] == "https://app.example"
    assert line["dialing"] == "ws://127.0.0.1:9"
    assert line["peers"] == line["clients"] + "/peer"  # no --peer-port: the same one
    assert "client tokens on, peer secret on, allowed origins https://app.example" in (
        line["message"])
