"""The web app: the Gradio chat at / and the OpenAI-compatible API at /v1 on
one port, one model, one device.

    python app.py                        # http://127.0.0.1:7860 (also what a Hugging Face Space runs)
    python app.py --model tiny --server-name 0.0.0.0 --auth alice:secret

Every flag also reads an environment variable (see --help), so a hosted Space
is configured from its settings page. The UI and the API share one FastAPI
app served by uvicorn; `--share` opens Gradio's share tunnel to that same
port, so the public link serves both.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from engine.config import EngineConfig, add_engine_args, env, env_bool  # noqa: E402
from server.routes import mount_api  # noqa: E402
from server.auth import parse_auth  # noqa: E402
from server.fairshare import ClientSlots, client_id  # noqa: E402
from server.hygiene import protect, uvicorn_config  # noqa: E402
from server.settings import ServerSettings, add_server_args  # noqa: E402
from ui.history import EXPORT_MAX_BYTES  # noqa: E402

log = logging.getLogger("app")
DEFAULT_UPLOAD_MB = 50


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    g = p.add_argument_group("web server")
    g.add_argument("--server-name", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for every interface "
                        "[env GRADIO_SERVER_NAME]")
    g.add_argument("--server-port", type=int, default=env("GRADIO_SERVER_PORT", "7860"),
                   help="[env GRADIO_SERVER_PORT]")
    g.add_argument("--share", action="store_true",
                   default=env_bool("GRADIO_SHARE") or env_bool("QWENVL_SHARE"),
                   help="also open a temporary public link through Gradio's share tunnel "
                        "(UI and API); ignored on a Hugging Face Space [env GRADIO_SHARE]")
    g.add_argument("--max-upload-mb", type=float,
                   default=env("QWENVL_MAX_UPLOAD_MB", str(DEFAULT_UPLOAD_MB)),
                   help="largest file a browser may upload [env QWENVL_MAX_UPLOAD_MB]")
    g.add_argument("--ui-concurrency", type=int, default=env("QWENVL_UI_CONCURRENCY"),
                   help="chat requests handed to the engine at once (default: --max-batch, so "
                        "they can share one batch); more wait in the page's queue "
                        "[env QWENVL_UI_CONCURRENCY]")
    g.add_argument("--root-path", default=env("GRADIO_ROOT_PATH"),
                   help="public path prefix behind a reverse proxy [env GRADIO_ROOT_PATH]")
    g.add_argument("--upload-ttl-hours", type=float,
                   default=float(env("QWENVL_UPLOAD_TTL_HOURS", "24")),
                   help="uploads, and the pages, drawn boxes and imported files made from them, "
                        "are deleted this many hours after they were written (and when the "
                        "server stops); 0 keeps them [env QWENVL_UPLOAD_TTL_HOURS]")
    g.add_argument("--max-export-mb", type=float,
                   default=float(env("QWENVL_MAX_EXPORT_MB",
                                     str(EXPORT_MAX_BYTES // 2**20))),
                   help="file bytes one Save JSON embeds at most (each distinct file once); "
                        "files past it are left out with a note [env QWENVL_MAX_EXPORT_MB]")
    g.add_argument("--feedback-file", default=env("QWENVL_FEEDBACK_FILE"),
                   help="append every like and dislike on an answer (question, answer, rating) "
                        "to this JSON-lines file; off by default [env QWENVL_FEEDBACK_FILE]")
    g.add_argument("--log-level", default=env("QWENVL_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="[env QWENVL_LOG_LEVEL]")
    add_server_args(p)
    return p


def open_doors(args: argparse.Namespace) -> list[str]:
    """Which ways in have no login, when the server can be reached from other machines
    (a share link, a non-loopback address); empty on loopback or with everything guarded."""
    if not (args.share or args.server_name not in ("127.0.0.1", "localhost", "::1")):
        return []
    doors = []
    if not args.auth:
        doors.append("the web page (add --auth USER:PASS)")
    if not args.auth and not args.api_key:
        doors.append("the API at /v1, /metrics and /version (--auth or --api-key guards it)")
    return doors


def open_access_warning(args: argparse.Namespace) -> str | None:
    """A loud warning naming every door left open when the server is published."""
    doors = open_doors(args)
    if not doors:
        return None
    where = "the public share link" if args.share else f"{args.server_name}:{args.server_port}"
    return (f"NO LOGIN on {' and on '.join(doors)}: anyone who can reach {where} can use this "
            "model and its device.")


def check_port_free(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve --server-name {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror} "
                             "(choose another --server-port)") from None


def create_app(engine: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(FastAPI app serving API + UI, the Blocks) for an engine and the parsed flags."""
    import gradio as gr
    from fastapi import FastAPI

    from ui.gate import LoginGate, gradio_session_check
    from ui.layout import ASSETS, CSS, THEME, UIOptions, browser_secret_from_env, build_demo

    settings = ServerSettings.from_namespace(args)
    slots = ClientSlots(settings.client_limit(engine))   # one per-client cap, page and API
    concurrency = args.ui_concurrency or args.max_batch
    demo = build_demo(engine, UIOptions(concurrency=max(1, concurrency),
                                        max_queue=max(1, args.max_queue),
                                        browser_secret=browser_secret_from_env(),
                                        feedback_file=Path(args.feedback_file)
                                        if args.feedback_file else None,
                                        upload_ttl_s=int(args.upload_ttl_hours * 3600),
                                        max_export_bytes=int(args.max_export_mb * 2**20),
                                        admit=lambda request: slots.acquire(page_client(request))))
    app = FastAPI(title="Qwen2.5-VL", docs_url=None, redoc_url=None, openapi_url=None)
    mount_api(app, engine, settings, slots)   # before the UI's catch-all at /
    users = parse_auth(args.auth)
    gr.mount_gradio_app(
        app, demo, path="/", auth=users,
        auth_message="Log in to chat with Qwen2.5-VL.",
        allowed_paths=[str(ASSETS)], max_file_size=f"{int(args.max_upload_mb * 1024)}kb",
        root_path=args.root_path, ssr_mode=False, show_error=False,
        footer_links=["api", "settings"], run_history=False, theme=THEME, css=CSS,
        server_name=args.server_name, server_port=args.server_port)
    # Gradio checks that a file named in an event's data was uploaded (lies in its upload
    # folder) only once `launch()` has run; mounted under uvicorn it never has, so every
    # path a browser sends would be copied into the cache and served. Turn the check on.
    demo.has_launched = True
    app.add_middleware(LoginGate, logged_in=gradio_session_check(gradio_sub_app(app)),
                       enabled=bool(users))
    protect(app, settings, upload_bytes=int(args.max_upload_mb * 2**20))   # outermost
    return app, demo


def page_client(request: Any) -> str:
    """Who a page event comes from, spelt as the API spells it (its login, else its address)."""
    client = getattr(request, "client", None)
    return client_id(user=getattr(request, "username", None),
                     address=getattr(client, "host", None))


def gradio_sub_app(app: Any) -> Any:
    """The Gradio App mounted at / (its stop_event ends the pages' heartbeat streams)."""
    from starlette.routing import Mount

    return next((r.app for r in app.routes if isinstance(r, Mount) and r.path == ""), None)


def make_server(app: Any, host: str, port: int, settings: ServerSettings | None = None) -> Any:
    """uvicorn as server.hygiene configures it, plus one thing Gradio's own launcher does on
    exit: tell open pages' heartbeat streams to end, so Ctrl-C does not wait for them."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            gradio_app = gradio_sub_app(app)
            if self.loop is not None and gradio_app is not None:
                self.loop.call_soon_threadsafe(gradio_app.stop_event.set)
            super().handle_exit(sig, frame)

    return Server(uvicorn_config(app, host, port, settings or ServerSettings(),
                                 log_level="warning", timeout_graceful_shutdown=3))


def open_share_link(demo: Any, host: str, port: int) -> str | None:
    """Gradio's share tunnel to this port (needs internet access); None when it fails."""
    from gradio import networking

    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        return networking.setup_tunnel(local, port, demo.share_token, None, None)
    except Exception as exc:  # no network, blocked binary download, ...
        log.warning("could not create a share link (%s: %s); serving locally only",
                    type(exc).__name__, exc)
        return None


def announce(server: Any, demo: Any, args: argparse.Namespace) -> None:
    """Print the URLs once uvicorn listens, then open the share link if asked."""
    while not server.started and not server.should_exit:
        threading.Event().wait(0.05)
    if not server.started:
        return
    shown = "127.0.0.1" if args.server_name in ("0.0.0.0", "::") else args.server_name
    print(f"* Running on local URL:  http://{shown}:{args.server_port}", flush=True)
    if args.share:
        if os.environ.get("SPACE_ID"):
            log.warning("--share is ignored on a Hugging Face Space")
        else:
            url = open_share_link(demo, args.server_name, args.server_port)
            if url:
                print(f"* Running on public URL: {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        parse_auth(args.auth)
        check_port_free(args.server_name, args.server_port)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    warning = open_access_warning(args)
    if warning:
        log.warning("%s\n%s\n%s", "!" * 72, warning, "!" * 72)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if getattr(args, "backend", "local") == "remote" and not getattr(args, "remote_url", None):
        parser.error("--backend remote needs --remote-url http://HOST:8000/v1")

    from engine.errors import EngineError
    from engine.factory import create_engine
    from engine.memory import configure_malloc

    configure_malloc()   # big image buffers go back to the system when freed (bench/soak.py)

    try:
        engine = create_engine(EngineConfig.from_namespace(args))
    except (EngineError, RuntimeError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1

    try:
        app, demo = create_app(engine, args)
        server = make_server(app, args.server_name, args.server_port,
                             ServerSettings.from_namespace(args))
        threading.Thread(target=announce, args=(server, demo, args), daemon=True,
                         name="announce").start()
        server.run()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
