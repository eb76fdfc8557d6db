"""The one launch sequence of both front doors, `python app.py` (the page and the API) and
`python -m server` (the API alone): read the flags, set up logging, refuse flags that
cannot work before the slow model load, load the engine, serve its app under uvicorn until
Ctrl-C, close the engine. Each door says only what differs (`FrontDoor`)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from engine.config import EngineConfig, setting

from .auth import parse_auth
from .settings import ServerSettings

if TYPE_CHECKING:
    from engine.base import Engine

LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level_setting(group: str | None = None) -> Any:
    """The --log-level field both doors have (one default, one variable)."""
    return setting("info", env="QWENVL_LOG_LEVEL", group=group, choices=LOG_LEVELS,
                   help="how much the server logs")


@dataclass
class ApiServerFlags:
    """`python -m server`'s own flags: where it listens and how much it logs."""

    host: str = setting("127.0.0.1", env="QWENVL_HOST",
                        help="address to listen on; 0.0.0.0 for every interface")
    port: int = setting(8000, env="QWENVL_PORT", help="port to listen on")
    log_level: str = log_level_setting()


@dataclass
class Site:
    """What a door serves: its ASGI app, and what to do once it listens (print the URLs)
    and when it is asked to stop (end long-lived streams so Ctrl-C does not wait)."""

    app: Any
    on_listening: Callable[[], None] | None = None
    on_exit: Callable[[], None] | None = None


@dataclass
class FrontDoor:
    """What differs between the two launchers; `launch` does the rest."""

    parser: argparse.ArgumentParser
    build: Callable[[Engine, argparse.Namespace], Site]   # (engine, flags) -> what to serve
    host_flag: str = "--host"
    port_flag: str = "--port"
    check: Callable[[argparse.Namespace], None] | None = None   # more checks: ValueError
    uvicorn_log_level: str | None = None    # None: the --log-level
    graceful_shutdown_s: float = 5

    def address(self, args: argparse.Namespace) -> tuple[str, int]:
        return (getattr(args, self.host_flag[2:].replace("-", "_")),
                getattr(args, self.port_flag[2:].replace("-", "_")))


def launch(door: FrontDoor, argv: list[str] | None = None) -> int:
    """Parse, check, load, serve, close. Bad flags exit 2 before the model load (argparse's
    usage error); an engine that cannot load prints one `error:` line and returns 1."""
    args = door.parser.parse_args(argv)
    setup_logging(args.log_level)
    host, port = door.address(args)
    try:
        check_flags(args, door)
        check_port_free(host, port, door.host_flag, door.port_flag)
    except (ValueError, OSError) as exc:
        door.parser.error(str(exc))

    from engine.errors import EngineError
    from engine.factory import create_engine
    from engine.model.memory import configure_malloc

    configure_malloc()   # big image buffers go back to the system when freed (bench/soak.py)
    try:
        engine = create_engine(EngineConfig.from_namespace(args))
    except (EngineError, RuntimeError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1
    try:
        site = door.build(engine, args)
        server = make_server(site, host, port, ServerSettings.from_namespace(args),
                             log_level=door.uvicorn_log_level or args.log_level,
                             timeout_graceful_shutdown=door.graceful_shutdown_s)
        if site.on_listening:
            threading.Thread(target=when_listening, args=(server, site.on_listening),
                             daemon=True, name="announce").start()
        server.run()
    finally:
        engine.close()
    return 0


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per remote call is noise


def check_flags(args: argparse.Namespace, door: FrontDoor) -> None:
    """Flags that parse but cannot work, refused before the model load: logins that cannot
    be read, a remote backend without its URL, and the door's own."""
    parse_auth(args.auth)
    EngineConfig.from_namespace(args).check()
    if door.check:
        door.check(args)


def check_port_free(host: str, port: int, host_flag: str = "--host",
                    port_flag: str = "--port") -> None:
    """Fail before the (slow) model load when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host_flag} {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror} "
                             f"(choose another {port_flag})") from None


def make_server(site: Site, host: str, port: int, settings: ServerSettings,
                **uvicorn_options: Any) -> Any:
    """uvicorn as server.hygiene configures it; on Ctrl-C it first runs the site's on_exit
    on the server's event loop."""
    import asyncio

    import uvicorn

    from .hygiene import uvicorn_config

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.loop is not None and site.on_exit is not None:
                self.loop.call_soon_threadsafe(site.on_exit)
            super().handle_exit(sig, frame)

    return Server(uvicorn_config(site.app, host, port, settings, **uvicorn_options))


def when_listening(server: Any, then: Callable[[], None]) -> None:
    """Call `then` once uvicorn listens (not at all if it stops first)."""
    while not server.started and not server.should_exit:
        threading.Event().wait(0.05)
    if server.started:
        then()
