"""The node's status page (issue 10): a static HTML/JS/CSS page shipped in the package.

The page holds no data: it opens the node's own client WebSocket (as any client, token
included) and draws what ``nodes`` and ``stats`` answer. So serving it needs no token,
and ``/`` serves it to a browser that does not ask for a WebSocket upgrade.

``/status`` is the page, ``/status/<file>`` its script and style, and
``/status/admission`` tells the page why its WebSocket was refused (a browser shows a
script nothing of a failed upgrade): the token check of :mod:`swarm.edge.admission`,
run on the page's own request.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from twisted.web.pages import notFound
from twisted.web.resource import Resource

from swarm.edge.admission import Admission

#: The page's files: name -> content type.
_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "status.js": b"text/javascript; charset=utf-8",
    "status.css": b"text/css; charset=utf-8",
}

#: Only the page's own files; its one connection goes to the node (ws: or wss:).
_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'")


def _no_store(request: Any, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-security-policy", _CSP)
    request.setHeader(b"referrer-policy", b"no-referrer")  # ?token= stays on the page


class StaticFile(Resource):
    """One file of the page, read once from the package."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.content_type = _FILES[name]
        self.body = (resources.files("swarm.edge") / "static" / name).read_bytes()

    def render_GET(self, request: Any) -> bytes:
        _no_store(request, self.content_type)
        return self.body

    render_HEAD = render_GET


class AdmissionCheck(Resource):
    """``GET /status/admission[?token=…]``: ``{"admitted": true}``, or false with the
    ``code`` and ``reason`` the WebSocket upgrade was refused with."""

    isLeaf = True

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self.admission = admission

    def render_GET(self, request: Any) -> bytes:
        # A same-origin fetch carries no Origin, so only the token is checked here.
        refused = self.admission.refusal(request)
        body: dict = {"admitted": refused is None}
        if refused is not None:
            body["code"], body["reason"] = refused
        _no_store(request, b"application/json")
        return json.dumps(body).encode("utf-8")


class StatusResource(Resource):
    """``/status``: the page; ``/status/<file>``: its script and style."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self.page = StaticFile("index.html")
        for name in _FILES:
            if name != "index.html":
                self.putChild(name.encode(), StaticFile(name))
        self.putChild(b"admission", AdmissionCheck(admission))

    def getChild(self, path: bytes, request: Any) -> Resource:
        return self.page if path == b"" else notFound()

    def render(self, request: Any) -> Any:
        return self.page.render(request)


class ClientOrPage(Resource):
    """``/``: a WebSocket upgrade goes to ``websocket`` (the client endpoint, admission
    checks included); any other request gets the status page."""

    isLeaf = True

    def __init__(self, websocket: Resource, page: Resource) -> None:
        super().__init__()
        self.websocket = websocket
        self.page = page

    def render(self, request: Any) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if b"websocket" in upgrade:
            return self.websocket.render(request)
        return self.page.render(request)
