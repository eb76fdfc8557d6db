"""The API alone, like `vllm serve`:

    python -m server --model tiny --port 8000

then `curl http://localhost:8000/v1/chat/completions ...`. The web app
(app.py) serves the same routes next to its UI on one port.
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.config import EngineConfig, add_engine_args, env

from .settings import ServerSettings, add_server_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=env("QWENVL_HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for every interface [env QWENVL_HOST]")
    p.add_argument("--port", type=int, default=int(env("QWENVL_PORT", "8000")),
                   help="[env QWENVL_PORT]")
    p.add_argument("--log-level", default=env("QWENVL_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    add_server_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per remote call is noise
    if args.backend == "remote" and not args.remote_url:
        print("error: --backend remote needs --remote-url http://HOST:8000/v1", file=sys.stderr)
        return 2

    import uvicorn

    from engine.errors import EngineError
    from engine.factory import create_engine
    from engine.memory import configure_malloc

    configure_malloc()   # big image buffers go back to the system when freed (bench/soak.py)

    from .hygiene import uvicorn_config
    from .routes import create_api_app

    try:
        engine = create_engine(EngineConfig.from_namespace(args))
    except (EngineError, RuntimeError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    settings = ServerSettings.from_namespace(args)
    app = create_api_app(engine, settings)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, settings,
                                      log_level=args.log_level,
                                      timeout_graceful_shutdown=5)).run()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
