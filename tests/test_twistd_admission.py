"""``twistd swarmcache --client-token-file``: a real process refuses clients without a
token and serves those with one, through a third-party client (``websockets``)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
import pytest_twisted
import websockets
from conftest import on_asyncio
from twistd_support import Twistd, eventually, start_node
from websockets.exceptions import InvalidStatus

TOKEN = "twistd-client-token"


async def set_get(url: str, **kw) -> None:
    async with websockets.connect(url, open_timeout=10, **kw) as ws:
        await ws.send(json.dumps({"id": 1, "op": "set", "key": "k", "value": "v"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["ok"] is True
        await ws.send(json.dumps({"id": 2, "op": "get", "key": "k"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["value"] == "v"


async def status_of_refusal(url: str, **kw) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, open_timeout=10, **kw):
            pass
    return info.value.response.status_code


def bearer(token: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


@pytest_twisted.ensureDeferred
async def test_client_token_file_end_to_end(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# clients of the test\n\n{TOKEN}\n")
    node = start_node(tmp_path, "tok1", "--client-token-file", str(tokens))
    try:
        async def check() -> None:
            assert await status_of_refusal(node.url) == 401
            assert await status_of_refusal(node.url, **bearer("wrong")) == 403
            await set_get(node.url, **bearer(TOKEN))
            await set_get(node.url + f"/?token={TOKEN}", origin="https://evil.example")
            assert await status_of_refusal(node.url, origin="https://evil.example") == 401

        await on_asyncio(check())
        assert TOKEN not in node.output()
    finally:
        node.kill()


def test_empty_token_file_stops_the_start_with_a_clear_error(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# no token yet\n\n")
    t = Twistd(tmp_path, ["-n", "--pidfile=", "swarmcache", "--port", "0",
                          "--client-token-file", str(tokens)], "empty")
    try:
        assert t.wait() != 0
        assert "no client tokens" in t.output(), t.describe()
    finally:
        t.kill()


@pytest_twisted.ensureDeferred
async def test_sighup_rereads_the_token_file(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    node = start_node(tmp_path, "tok2", "--client-token-file", str(tokens))
    try:
        await on_asyncio(set_get(node.url, **bearer(TOKEN)))
        Path(tokens).write_text("new-token\n")
        node.proc.send_signal(signal.SIGHUP)

        async def new_one_works() -> bool:
            await on_asyncio(set_get(node.url, **bearer("new-token")), 5)
            return True

        await eventually(new_one_works, "the new token to work", 10, node.describe)
        assert await on_asyncio(status_of_refusal(node.url, **bearer(TOKEN))) == 403
    finally:
        node.kill()
