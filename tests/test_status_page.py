"""The status page (issue 10) in a real browser: headless Debian chromium, driven by
selenium, against real ``twistd swarmcache`` processes (selenium blocks, so the nodes
must run elsewhere). A line n1 - n2 - n3 whose third id is markup, and one node with
client tokens.

``SWARM_STATUS_SCREENSHOT=$PWD/docs/status.png`` takes the picture of the docs (a
four-node swarm, :func:`test_screenshot`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import urllib.request

import pytest
from twisted.web.test.requesthelper import DummyRequest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from swarm.edge.admission import Admission
from twistd_support import start_node

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 10.0  # seconds any one condition in the page may take
#: A node id that is markup: the page must show it as text.
HOSTILE = '<b id="x">n3</b>'
TOKEN = "status-page-token"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver)",
)

#: What the page shows, read in one go (it redraws every second).
SNAPSHOT = """
const text = (el) => el ? el.textContent : null;
return {
  state: document.body.dataset.state,
  error: text(document.getElementById("error")),
  self: text(document.getElementById("self")),
  nodes: [...document.querySelectorAll("#graph g.node")].map((g) => ({
    id: g.dataset.node, self: g.classList.contains("self"),
    hops: text(g.querySelector(".hops")), label: text(g.querySelector(".label"))})),
  links: [...document.querySelectorAll("#graph line.link")].map((l) => [l.dataset.a, l.dataset.b]),
  rows: Object.fromEntries([...document.querySelectorAll("#nodes tbody tr")].map((tr) =>
    [tr.dataset.node,
     Object.fromEntries([...tr.cells].map((td) => [td.className, td.textContent]))])),
  injected: document.querySelectorAll("#x, img, script:not([src])").length,
};
"""


def call(port: int, op: str, token: str | None = None, **args) -> dict:
    """One request on a new WebSocket to ``/`` (no Origin: a program, not a browser)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with connect(f"ws://127.0.0.1:{port}/", additional_headers=headers,
                 open_timeout=5) as ws:
        ws.send(json.dumps({"id": 1, "op": op, **args}))
        return json.loads(ws.recv(timeout=5))


def until(driver, condition, what: str):
    """The page's snapshot once ``condition(snapshot)`` holds; fails after WAIT s."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    last: list = [None]

    def check(d):
        last[0] = d.execute_script(SNAPSHOT)
        return last[0] if condition(last[0]) else False

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(check)
    except TimeoutException:
        raise AssertionError(f"the page did not show {what} within {WAIT}s; "
                             f"it shows {last[0]!r}") from None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="swarm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """n1 - n2 - n3 (n3's id is HOSTILE), once n1 reaches all three; their ports."""
    workdir = tmp_path_factory.mktemp("line")
    started = []
    try:
        started.append(start_node(workdir, "n1"))
        started.append(start_node(workdir, "n2", f"--peer={started[0].url}"))
        started.append(start_node(workdir, HOSTILE, f"--peer={started[1].url}", name="n3"))
        ports = {"n1": started[0].port, "n2": started[1].port, HOSTILE: started[2].port}
        yield ports
    finally:
        for proc in started:
            proc.kill()


def test_page_draws_the_swarm_and_updates_live(browser, line):
    # / without an upgrade is the page; the node's own origin is let in without a token
    browser.get(f"http://127.0.0.1:{line['n1']}/")
    shown = until(browser, lambda s: s["state"] == "connected" and len(s["nodes"]) == 3
                  and len(s["links"]) == 2, "three nodes and two links")
    assert shown["self"] == "n1"
    assert {n["id"]: n["hops"] for n in shown["nodes"]} == {"n1": "0", "n2": "1", HOSTILE: "2"}
    assert [n["id"] for n in shown["nodes"] if n["self"]] == ["n1"]
    assert {frozenset(link) for link in shown["links"]} == {
        frozenset({"n1", "n2"}), frozenset({"n2", HOSTILE})}
    assert {k: r["hops"] for k, r in shown["rows"].items()} == {
        "n1": "0", "n2": "1", HOSTILE: "2"}
    # markup in an id is text: shown as written, never parsed
    assert shown["injected"] == 0
    assert shown["rows"][HOSTILE]["node"] == HOSTILE
    assert [n["label"] for n in shown["nodes"] if n["id"] == HOSTILE] == [HOSTILE]

    # another node's stats: its numbers when `stats` takes `node`, else "—"
    other = call(line["n1"], "stats", node="n2")
    answers = other.get("ok") and other["stats"].get("node") == "n2"
    until(browser, lambda s: s["rows"]["n1"]["keys"].isdigit() and s["rows"]["n1"]["rate"]
          != "—" and s["rows"]["n2"]["keys"].isdigit() == bool(answers),
          f"n1's keys and request rate, and n2's keys {'' if answers else 'as —'}")

    # a write to the key's primary shows in its row within a refresh or two
    owner = call(line["n1"], "owner", key="status:live")["nodes"][0]
    port = line[owner]
    browser.get(f"http://127.0.0.1:{port}/status")
    before = int(until(browser, lambda s: s["rows"].get(owner, {}).get("keys", "").isdigit(),
                       f"{owner}'s keys")["rows"][owner]["keys"])
    assert call(port, "set", key="status:live", value="x")["ok"]
    until(browser, lambda s: s["rows"][owner]["keys"] == str(before + 1),
          f"{owner}'s keys go from {before} to {before + 1}")



def test_root_still_takes_websocket_clients(line):
    port = line["n1"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert b"/status/status.js" in page.read()
    assert call(port, "ping") == {"id": 1, "ok": True, "node": "n1"}
    # a foreign page is still refused
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/", origin="http://evil.example", open_timeout=5)
    assert refused.value.response.status_code == 403


def test_own_origin_only_by_address():
    def upgrade(host: str, origin: str, secure: bool = False) -> DummyRequest:
        request = DummyRequest([b""])
        request.isSecure = lambda: secure
        request.requestHeaders.setRawHeaders(b"host", [host.encode()])
        request.requestHeaders.setRawHeaders(b"origin", [origin.encode()])
        return request

    admission = Admission()
    assert admission.refusal(upgrade("127.0.0.1:8765", "http://127.0.0.1:8765")) is None
    assert admission.refusal(upgrade("localhost:8765", "http://localhost:8765/")) is None
    assert admission.refusal(upgrade("[::1]:8765", "http://[::1]:8765")) is None
    assert admission.refusal(upgrade("127.0.0.1:8765", "https://127.0.0.1:8765", True)) is None
    # another port, scheme or host is another origin
    for host, origin in [("127.0.0.1:8765", "http://127.0.0.1:8766"),
                         ("127.0.0.1:8765", "https://127.0.0.1:8765"),
                         ("127.0.0.1:8765", "http://localhost:8765"),
                         # a name could be rebound to the node's address by its owner
                         ("cache.example:8765", "http://cache.example:8765")]:
        assert admission.refusal(upgrade(host, origin)) == (403, "origin not allowed")


def test_page_with_and_without_token(browser, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    node = start_node(tmp_path, "t1", "--client-token-file", str(tokens))
    try:
        port = node.port
        browser.get(f"http://127.0.0.1:{port}/status")
        shown = until(browser, lambda s: "no client token" in s["error"], "an auth error")
        assert shown["state"] != "connected" and shown["nodes"] == []
        # the upgrade on / still wants the token
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}/", open_timeout=5)
        assert refused.value.response.status_code == 401
        assert call(port, "ping", token=TOKEN)["ok"]

        browser.get(f"http://127.0.0.1:{port}/status?token={TOKEN}")
        shown = until(browser, lambda s: s["state"] == "connected" and s["self"] == "t1"
                      and s["rows"].get("t1", {}).get("keys") == "0", "t1 with a token")
        assert shown["error"] == ""

        # the node goes away and comes back: the page says so, then reconnects
        node.proc.send_signal(signal.SIGTERM)
        node.wait()
        until(browser, lambda s: s["state"] != "connected", "the lost connection")
        node = start_node(tmp_path, "t1", "--client-token-file", str(tokens), port=port,
                          name="t1-again")
        until(browser, lambda s: s["state"] == "connected" and s["self"] == "t1",
              "the connection again")
    finally:
        node.kill()


@pytest.mark.skipif(not os.environ.get("SWARM_STATUS_SCREENSHOT"),
                    reason="SWARM_STATUS_SCREENSHOT=PATH takes the docs' picture")
def test_screenshot(browser, tmp_path):
    """Four nodes (n1 - n2 - n3 - n4), reads and writes going on at each."""
    dials = {"n1": [], "n2": ["n1"], "n3": ["n2"], "n4": ["n3"]}
    nodes = {}
    stop = threading.Event()
    writers: list[threading.Thread] = []
    try:
        for name, peers in dials.items():
            nodes[name] = start_node(tmp_path, name, *(f"--peer={nodes[p].url}" for p in peers))

        def write(port: int) -> None:
            with connect(f"ws://127.0.0.1:{port}/", open_timeout=5) as ws:
                for n in range(1_000_000):
                    if stop.is_set():
                        return
                    key = f"demo:{port}:{n // 2 % 60}"
                    request = {"id": n, "op": "get", "key": key} if n % 2 else \
                        {"id": n, "op": "set", "key": key, "value": "v" * (n % 2000)}
                    ws.send(json.dumps(request))
                    ws.recv(timeout=5)

        writers = [threading.Thread(target=write, args=(proc.port,), daemon=True)
                   for proc in nodes.values()]
        for writer in writers:
            writer.start()
        port = nodes["n2"].port
        browser.get(f"http://127.0.0.1:{port}/status")
        until(browser, lambda s: len(s["nodes"]) == 4 and len(s["links"]) == 3
              and all(r["rate"] not in ("—", "0.0") for r in s["rows"].values()),
              "four busy nodes")
        browser.save_screenshot(os.environ["SWARM_STATUS_SCREENSHOT"])
    finally:
        stop.set()
        for writer in writers:
            writer.join(5)  # before its node goes
        for proc in nodes.values():
            proc.kill()
