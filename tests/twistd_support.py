"""Real ``twistd swarmcache`` processes for the tests, on 127.0.0.1 only.

The plugin is found in the installed package, so reinstall it (``pip install .``) after
changing ``swarm/``. Output goes to files, never a pipe that could fill up; every wait
polls a condition against a deadline, nothing sleeps blindly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: How long a node may take to answer /health after the process starts.
START_DEADLINE = 15.0
#: How long a node may take to exit after SIGTERM, or a doomed twistd to give up.
EXIT_DEADLINE = 15.0
POLL = 0.05


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> tuple[int, Any]:
    """``GET /health``: (status, parsed body), or (0, error text) when it cannot connect."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


class Twistd:
    """One ``twistd`` process, its stdout and stderr captured in files in ``workdir``."""

    def __init__(self, workdir: Path, args: list[str], name: str = "twistd",
                 port: int | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.port = port
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # lines reach the files if killed
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [TWISTD, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                cwd=workdir, env=env,
            )

    @property
    def url(self) -> str:
        """Where a node started with a ``port`` takes WebSocket clients."""
        return f"ws://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything it wrote so far: stdout, then stderr."""
        return (self.out_path.read_text(errors="replace")
                + self.err_path.read_text(errors="replace"))

    def describe(self) -> str:
        """Its command line, exit status and the last 4000 characters of its output."""
        return (f"twistd {' '.join(self.args)} (exit {self.proc.poll()}):\n"
                + self.output()[-4000:])

    def wait(self, timeout: float = EXIT_DEADLINE) -> int:
        """Block until it exits; its status. Fails if it still runs after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            msg = f"still running after {timeout}s; {self.describe()}"
            raise AssertionError(msg) from None

    async def exited(self, timeout: float = EXIT_DEADLINE) -> int:
        """Like :meth:`wait`, polling on the reactor instead of blocking it."""

        async def gone() -> bool:
            return self.proc.poll() is not None

        await eventually(gone, "twistd to exit", timeout, self.describe)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL it unless it has already exited."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_node(workdir: Path, node_id: str, *options: str, port: int | None = None,
               name: str | None = None, attempts: int = 5) -> Twistd:
    """``twistd -n --pidfile= swarmcache --port P --node-id ID *options``, once /health
    names it. Without a fixed ``port`` a free one is picked, and another when twistd
    loses the race for it ("cannot listen"); a process that fails to start is killed."""
    for attempt in range(1 if port is not None else attempts):
        p = port or free_port()
        t = Twistd(
            workdir,
            ["-n", "--pidfile=", "swarmcache", "--port", str(p), "--node-id", node_id,
             *options],
            name=f"{name or node_id}-{attempt}",
            port=p,
        )
        try:
            deadline = time.monotonic() + START_DEADLINE
            while t.proc.poll() is None:
                code, body = health(p)
                if code == 200 and isinstance(body, dict) and body.get("node") == node_id:
                    return t
                if time.monotonic() > deadline:
                    raise AssertionError(f"no healthy /health within {START_DEADLINE}s "
                                         f"(last: {code} {body!r}); {t.describe()}")
                time.sleep(POLL)
        except BaseException:
            t.kill()
            raise
        if "cannot listen" not in t.output():
            raise AssertionError(f"the node exited while starting; {t.describe()}")
    raise AssertionError(f"could not start {node_id}; {t.describe()}")


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float,
                     logs: Callable[[], str] = lambda: "") -> Any:
    """Await ``check()`` every POLL seconds until it returns something true; its
    exceptions count as "not yet". Fails with ``logs()`` after ``timeout`` seconds."""
    from twisted.internet import reactor  # after pytest-twisted installs asyncio's
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
        except Exception as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                                 f"(last: {last!r})\n{logs()}")
        await deferLater(reactor, POLL, lambda: None)
