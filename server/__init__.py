"""OpenAI-compatible HTTP API (vLLM's entrypoints/openai shapes) over any engine.

    from server.routes import create_api_app, mount_api
    from server.settings import ServerSettings, add_server_args
"""

__version__ = "0.1.0"
