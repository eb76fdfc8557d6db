"""Serve an ASGI app from a background thread on a loopback port the OS picks:
for tests, benchmarks and notebooks that need a real HTTP server (real
sockets, real disconnects) inside the current process."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import ServerSettings


class BackgroundServer:
    """`with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", log_level: str = "warning",
                 settings: "ServerSettings | None" = None, **uvicorn_kwargs: Any) -> None:
        """Served as the launchers serve (server.hygiene.uvicorn_config with `settings`,
        default ServerSettings()); `uvicorn_kwargs` override single Config arguments."""
        import uvicorn

        from .hygiene import uvicorn_config
        from .settings import ServerSettings

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn_config(app, host, self.port, settings or ServerSettings(),
                                **{"log_level": log_level, "lifespan": "off",
                                   "timeout_graceful_shutdown": 2, **uvicorn_kwargs})
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
