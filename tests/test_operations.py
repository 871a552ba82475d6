"""The command lines docs/operations.md ships (a systemd unit, a Dockerfile) start a
node that serves, reloads and stops as the documents say.

No container engine runs on the test machines, so the Dockerfile's ENTRYPOINT and
HEALTHCHECK are run as they stand, on loopback, against the installed package; the unit's
ExecStart likewise, with the test's twistd in place of /opt/swarmcache's.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from twistd_support import CLEAN_SIGTERM_STATUS, POLL, Twistd, free_port, health

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def healthy(node: Twistd, deadline: float = 15.0) -> dict:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert node.proc.poll() is None, node.describe()
        code, body = health(node.port)
        if code == 200:
            return body
        time.sleep(POLL)
    raise AssertionError(f"no /health within {deadline}s; {node.describe()}")


def unit_exec_start() -> list[str]:
    lines = (EXAMPLES / "swarmcache.service").read_text().splitlines()
    (line,) = [x for x in lines if x.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_systemd_units_command_serves_reloads_and_stops_cleanly(tmp_path):
    argv = unit_exec_start()
    assert argv[0] == "/opt/swarmcache/bin/twistd" and "%H" in argv
    port = free_port()
    args = [a.replace("%H", "unit-node").replace("tcp:8765:", f"tcp:{port}:") for a in argv[1:]]
    tokens = tmp_path / "tokens"
    tokens.write_text("t1\n")
    node = Twistd(tmp_path, [*args, "--client-token-file", str(tokens)], name="unit", port=port)
    try:
        assert healthy(node)["node"] == "unit-node"
        tokens.write_text("t1\nt2\n")
        node.proc.send_signal(signal.SIGHUP)  # ExecReload: the tokens are read again
        end = time.monotonic() + 10
        while "2 client tokens loaded" not in node.output():
            assert time.monotonic() < end and node.proc.poll() is None, node.describe()
            time.sleep(POLL)
        lines = [json.loads(x) for x in node.out_path.read_text().splitlines() if x.strip()]
        assert lines  # --log-format json: every line an object
        node.proc.send_signal(signal.SIGTERM)  # KillSignal
        assert node.wait() in CLEAN_SIGTERM_STATUS
    finally:
        node.kill()


def test_the_dockerfiles_entrypoint_and_healthcheck(tmp_path):
    text = (EXAMPLES / "Dockerfile").read_text()
    entry = json.loads(next(x for x in text.splitlines() if x.startswith("ENTRYPOINT ")
                            ).removeprefix("ENTRYPOINT "))
    check = json.loads(next(x for x in text.splitlines() if x.startswith("HEALTHCHECK CMD ")
                            ).removeprefix("HEALTHCHECK CMD "))
    assert entry[0] == "twistd" and "tcp:8765:interface=0.0.0.0" in entry
    port = free_port()  # loopback only here
    args = [a.replace("tcp:8765:interface=0.0.0.0", f"tcp:{port}:interface=127.0.0.1")
            for a in entry[1:]] + ["--node-id", "n1"]
    node = Twistd(tmp_path, args, name="docker", port=port)
    try:
        healthy(node)
        probe = [sys.executable if check[0] == "python" else check[0], *check[1:]]
        probe[-1] = probe[-1].replace("8765", str(port))
        assert subprocess.run(probe, timeout=10).returncode == 0
        node.kill()
        assert subprocess.run(probe, timeout=10, capture_output=True).returncode != 0
    finally:
        node.kill()
