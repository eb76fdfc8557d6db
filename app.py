"""The web app: the Gradio chat at / and the OpenAI-compatible API at /v1 on
one port, one model, one device.

    python app.py                        # http://127.0.0.1:7860 (also what a Hugging Face Space runs)
    python app.py --model tiny --server-name 0.0.0.0 --auth alice:secret

Every flag also reads an environment variable (see --help and
docs/configuration.md), so a hosted Space is configured from its settings page.
The UI and the API share one FastAPI app served by uvicorn (started by
server.launch, as `python -m server` is); `--share` opens Gradio's share tunnel
to that same port, so the public link serves both.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from engine.config import add_engine_args, add_flags, namespace_values, setting  # noqa: E402
from server.auth import parse_auth  # noqa: E402,F401  (app.parse_auth: the tests' way in)
from server.fairshare import ClientSlots, client_id  # noqa: E402
from server.hygiene import protect  # noqa: E402
from server.launch import FrontDoor, Site, launch, log_level_setting  # noqa: E402
from server.routes import mount_api  # noqa: E402
from server.settings import ServerSettings, add_server_args  # noqa: E402
from ui.history import EXPORT_MAX_BYTES  # noqa: E402

log = logging.getLogger("app")
WEB = "web server"


@dataclass
class WebFlags:
    """The web app's own flags (the engine's and the API's are EngineConfig and
    ServerSettings)."""

    server_name: str = setting("127.0.0.1", env="GRADIO_SERVER_NAME", group=WEB,
                               help="address to listen on; 0.0.0.0 for every interface")
    server_port: int = setting(7860, env="GRADIO_SERVER_PORT", group=WEB,
                               help="port to listen on")
    share: bool = setting(
        False, env=("GRADIO_SHARE", "QWENVL_SHARE"), group=WEB, action="store_true",
        help="also open a temporary public link through Gradio's share tunnel (UI and API); "
             "ignored on a Hugging Face Space")
    max_upload_mb: float = setting(50.0, env="QWENVL_MAX_UPLOAD_MB", group=WEB,
                                   help="largest file a browser may upload")
    ui_concurrency: int | None = setting(
        None, env="QWENVL_UI_CONCURRENCY", group=WEB,
        help="chat requests handed to the engine at once (default: --max-batch, so they can "
             "share one batch); more wait in the page's queue")
    root_path: str | None = setting(None, env="GRADIO_ROOT_PATH", group=WEB,
                                    help="public path prefix behind a reverse proxy")
    upload_ttl_hours: float = setting(
        24.0, env="QWENVL_UPLOAD_TTL_HOURS", group=WEB,
        help="uploads, and the pages, drawn boxes and imported files made from them, are "
             "deleted this many hours after they were written (and when the server stops); "
             "0 keeps them")
    max_export_mb: float = setting(
        float(EXPORT_MAX_BYTES // 2**20), env="QWENVL_MAX_EXPORT_MB", group=WEB,
        help="file bytes one Save JSON embeds at most (each distinct file once); files past it "
             "are left out with a note")
    feedback_file: str | None = setting(
        None, env="QWENVL_FEEDBACK_FILE", group=WEB,
        help="append every like and dislike on an answer (question, answer, rating) to this "
             "JSON-lines file; off by default")
    log_level: str = log_level_setting(WEB)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    add_engine_args(p)
    add_flags(p, WebFlags)
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


def create_app(engine: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(FastAPI app serving API + UI, the Blocks) for an engine and the parsed flags."""
    import gradio as gr
    from fastapi import FastAPI

    from ui.gate import LoginGate, gradio_session_check
    from ui.layout import ASSETS, CSS, THEME, UIOptions, browser_secret_from_env, build_demo

    settings = ServerSettings.from_namespace(args)
    web = WebFlags(**namespace_values(args, WebFlags))
    slots = ClientSlots(settings.client_limit(engine))   # one per-client cap, page and API
    concurrency = web.ui_concurrency or args.max_batch
    demo = build_demo(engine, UIOptions(concurrency=max(1, concurrency),
                                        max_queue=max(1, args.max_queue),
                                        browser_secret=browser_secret_from_env(),
                                        feedback_file=Path(web.feedback_file)
                                        if web.feedback_file else None,
                                        upload_ttl_s=int(web.upload_ttl_hours * 3600),
                                        max_export_bytes=int(web.max_export_mb * 2**20),
                                        admit=lambda request: slots.acquire(page_client(request))))
    app = FastAPI(title="Qwen2.5-VL", docs_url=None, redoc_url=None, openapi_url=None)
    mount_api(app, engine, settings, slots)   # before the UI's catch-all at /
    users = list(settings.users) or None
    gr.mount_gradio_app(
        app, demo, path="/", auth=users,
        auth_message="Log in to chat with Qwen2.5-VL.",
        allowed_paths=[str(ASSETS)], max_file_size=f"{int(web.max_upload_mb * 1024)}kb",
        root_path=web.root_path, ssr_mode=False, show_error=False,
        footer_links=["api", "settings"], run_history=False, theme=THEME, css=CSS,
        server_name=web.server_name, server_port=web.server_port)
    # Gradio checks that a file named in an event's data was uploaded (lies in its upload
    # folder) only once `launch()` has run; mounted under uvicorn it never has, so every
    # path a browser sends would be copied into the cache and served. Turn the check on.
    demo.has_launched = True
    app.add_middleware(LoginGate, logged_in=gradio_session_check(gradio_sub_app(app)),
                       enabled=bool(users))
    protect(app, settings, upload_bytes=int(web.max_upload_mb * 2**20))   # outermost
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


def announce(demo: Any, args: argparse.Namespace) -> None:
    """Print the URLs (the tests and users wait for this line), then open the share link
    if asked."""
    shown = "127.0.0.1" if args.server_name in ("0.0.0.0", "::") else args.server_name
    print(f"* Running on local URL:  http://{shown}:{args.server_port}", flush=True)
    if args.share:
        if os.environ.get("SPACE_ID"):
            log.warning("--share is ignored on a Hugging Face Space")
        else:
            url = open_share_link(demo, args.server_name, args.server_port)
            if url:
                print(f"* Running on public URL: {url}", flush=True)


def check_web_flags(args: argparse.Namespace) -> None:
    """The web app's own checks before the model load: a loud warning for every door left
    open, and a refusal of an upload limit that admits nothing."""
    warning = open_access_warning(args)
    if warning:
        log.warning("%s\n%s\n%s", "!" * 72, warning, "!" * 72)
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")


def serve_web(engine: Any, args: argparse.Namespace) -> Site:
    """The page and the API for the launcher; Ctrl-C also ends open pages' heartbeat
    streams (what Gradio's own launcher does on exit), so it does not wait for them."""
    app, demo = create_app(engine, args)
    return Site(app, on_listening=lambda: announce(demo, args),
                on_exit=gradio_sub_app(app).stop_event.set)


def main(argv: list[str] | None = None) -> int:
    return launch(FrontDoor(build_parser(), serve_web, host_flag="--server-name",
                            port_flag="--server-port", check=check_web_flags,
                            uvicorn_log_level="warning", graceful_shutdown_s=3), argv)


if __name__ == "__main__":
    sys.exit(main())
