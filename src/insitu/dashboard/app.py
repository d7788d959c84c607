"""The dashboard's web app (Starlette, server-sent events) and the uvicorn thread that serves it.

Read-only by construction: every route is a GET that reads the :class:`DashboardFeed`; nothing a
browser sends reaches the run. Pages get the feed as JSON over server-sent events and render it with
the package's own script (no CDN, no inline script: the Content-Security-Policy allows only this
origin's files). Requests whose Host header is not this server's are refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
from importlib import resources
from typing import Any

from insitu.dashboard.feed import DashboardFeed

log = logging.getLogger("insitu.dashboard")

DEFAULT_PORT = 8050
ASSETS = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
TICK_S = 0.25  # how often a page's stream looks for news
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


def _need_web_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError("the dashboard needs Starlette and uvicorn: pip install 'insitu[dashboard]'") from None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP or ``localhost``) is reachable only from this machine."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(feed: DashboardFeed, allowed_hosts: list[str] | None = None) -> Any:
    """The Starlette app: ``/`` and its two assets, ``/api/state`` (a JSON snapshot) and ``/events`` (SSE)."""
    _need_web_stack()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    static = resources.files("insitu.dashboard") / "static"
    assets = {name: (static / name).read_bytes() for name in ASSETS}

    def asset(name: str) -> Any:
        async def serve(_request: Request) -> Response:
            return Response(assets[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)
        return serve

    async def state(_request: Request) -> Response:
        return JSONResponse(feed.snapshot(), headers=SECURITY_HEADERS)

    async def events(request: Request) -> Response:
        async def stream() -> Any:
            sent, seen_version, seen_live, last_write = 0, -1, None, time.monotonic()
            feed.viewer(True)
            try:
                while True:
                    live = feed.live()
                    if feed.version != seen_version or live != seen_live:
                        seen_version = feed.version
                        snapshot = feed.snapshot(sent)
                        sent, seen_live = snapshot["rounds_to"], snapshot["live"]
                        yield f"data: {json.dumps(snapshot, allow_nan=False)}\n\n"
                        last_write = time.monotonic()
                        if snapshot["done"]:
                            return
                    elif time.monotonic() - last_write > KEEPALIVE_S:
                        yield ": keepalive\n\n"
                        last_write = time.monotonic()
                    if await request.is_disconnected():
                        return
                    await asyncio.sleep(TICK_S)
            finally:
                feed.viewer(False)

        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    routes = [Route("/", asset("index.html"), methods=["GET"]),
              Route("/dashboard.js", asset("dashboard.js"), methods=["GET"]),
              Route("/dashboard.css", asset("dashboard.css"), methods=["GET"]),
              Route("/api/state", state, methods=["GET"]),
              Route("/events", events, methods=["GET"])]
    hosts = allowed_hosts or ["127.0.0.1", "localhost", "::1", "[::1]"]
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


class DashboardServer:
    """uvicorn serving the dashboard from a daemon thread, so the run's own thread never waits on a page."""

    def __init__(self, feed: DashboardFeed, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 allow_network: bool = False) -> None:
        _need_web_stack()
        if not is_loopback_host(host) and not allow_network:
            raise ValueError(f"the dashboard shows which clients take part and why they fail: it listens on "
                             f"127.0.0.1 unless you ask for {host!r} explicitly (--dashboard-host {host})")
        if not 0 <= port <= 65535:
            raise ValueError(f"--dashboard-port must be 0 (any free port) to 65535, got {port}")
        self.feed = feed
        self.host = host
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host.strip("[]"), port))
        except OSError as error:
            self._socket.close()
            raise OSError(f"the dashboard cannot listen on {host}:{port} ({error.strerror}): choose another "
                          f"--dashboard-port, or 0 for any free port") from None
        self._socket.listen(64)
        self.port = int(self._socket.getsockname()[1])
        wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
        allowed = ["*"] if wildcard else ["127.0.0.1", "localhost", "::1", "[::1]", host]
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._app = create_app(feed, allowed)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host.strip("[]") else f"[{self.host.strip('[]')}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        """Serve in the background; returns once uvicorn accepts connections."""
        import uvicorn

        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="insitu-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError("the dashboard's web server did not start (see the log above)")
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        """Let open pages receive the final snapshot (at most ``grace_s``), then stop serving."""
        deadline = time.monotonic() + grace_s
        while self.feed.viewers > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._socket.close()

    def serve_forever(self) -> None:
        """Block until Ctrl-C (``insitu dashboard RUN_DIR``)."""
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop(grace_s=0)
