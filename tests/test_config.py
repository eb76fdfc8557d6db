"""Each default stated once: the flags of `python app.py` and `python -m server` are
generated from the settings' fields, and must parse exactly as the hand-written parsers
did (every value below was read from them before the change, types included), read
the same environment variables, name them in --help, and be listed in
docs/configuration.md as the generator writes it. Both doors start through one launcher,
which refuses unworkable flags before the model load."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from pathlib import Path

import pytest

import app
from server.__main__ import build_parser as server_parser
from server.__main__ import main as server_main

ROOT = Path(__file__).resolve().parent.parent

ENGINE_DEFAULTS = {
    "model": "auto", "device": "auto", "dtype": None, "attn_implementation": "sdpa",
    "modelscope": False, "revision": None, "max_model_len": 16384, "limit_images": 10,
    "limit_videos": 2, "max_queue": 32, "max_batch": 8, "default_max_tokens": 512,
    "cpu_threads": None, "max_logprobs": 20, "max_media_mb": 50.0, "max_image_pixels": 64000000,
    "fetch_timeout": 10.0, "max_pixels_limit": 12845056, "max_prompt_chars": None,
    "video_fps": 2.0, "video_max_frames": 32, "video_max_pixels": 151200,
    "video_max_fps": 30.0, "video_max_decoded_pixels": 10000000000, "warmup": True,
    "log_stats_interval": 10.0, "kv_cache_gib": 8.0, "max_num_batched_tokens": 2048,
    "prefix_cache": True, "prefix_cache_gib": None, "encoder_cache_mb": 1024.0,
    "picture_cache_mb": 256.0, "enforce_eager": False, "npu_graphs": False,
    "backend": "local", "remote_url": None, "remote_api_key": None, "remote_model": None,
    "remote_timeout": 300.0, "remote_min_pixels": None, "remote_max_pixels": None,
    "remote_mm_kwargs": False,
}
API_DEFAULTS = {
    "auth": [], "api_key": None, "served_model_name": [], "allowed_local_media_path": [],
    "allowed_media_domains": [],
    "enable_tokenizer_info_endpoint": False, "enable_server_load_tracking": False,
    "enable_prompt_tokens_details": False,
    "max_body_mb": 64.0, "header_timeout": 10.0, "body_timeout": 30.0,
    "max_connections": 1000, "forwarded_allow_ips": None, "max_client_requests": None,
    "enable_auto_tool_choice": False, "tool_call_parser": None,
}
WEB_DEFAULTS = {
    "server_name": "127.0.0.1", "server_port": 7860, "share": False, "max_upload_mb": 50.0,
    "ui_concurrency": None, "root_path": None, "upload_ttl_hours": 24.0, "max_export_mb": 64.0,
    "feedback_file": None, "log_level": "info",
}
SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "log_level": "info"}

# (command-line words, where they land, the parsed value)
ENGINE_FLAGS = [
    (["-c", "some/model"], "model", "some/model"), (["--device", "cpu"], "device", "cpu"),
    (["--dtype", "float16"], "dtype", "float16"),
    (["--attn-implementation", "eager"], "attn_implementation", "eager"),
    (["--modelscope"], "modelscope", True), (["--revision", "r1"], "revision", "r1"),
    (["--max-model-len", "4096"], "max_model_len", 4096),
    (["--limit-images", "3"], "limit_images", 3), (["--limit-videos", "1"], "limit_videos", 1),
    (["--max-queue", "5"], "max_queue", 5), (["--max-batch", "4"], "max_batch", 4),
    (["--default-max-tokens", "77"], "default_max_tokens", 77),
    (["--cpu-threads", "3"], "cpu_threads", 3), (["--max-media-mb", "7.5"], "max_media_mb", 7.5), (["--max-logprobs", "5"], "max_logprobs", 5),
    (["--max-image-pixels", "1000000"], "max_image_pixels", 1000000),
    (["--fetch-timeout", "2.5"], "fetch_timeout", 2.5),
    (["--max-pixels-limit", "200000"], "max_pixels_limit", 200000),
    (["--max-prompt-chars", "999"], "max_prompt_chars", 999),
    (["--video-fps", "1.5"], "video_fps", 1.5), (["--video-max-frames", "8"], "video_max_frames", 8),
    (["--video-max-pixels", "5000"], "video_max_pixels", 5000),
    (["--video-max-fps", "12"], "video_max_fps", 12.0),
    (["--video-max-decoded-pixels", "123456789"], "video_max_decoded_pixels", 123456789),
    (["--no-warmup"], "warmup", False),
    (["--log-stats-interval", "0"], "log_stats_interval", 0.0),
    (["--kv-cache-gib", "0.5"], "kv_cache_gib", 0.5),
    (["--max-num-batched-tokens", "512"], "max_num_batched_tokens", 512),
    (["--no-prefix-cache"], "prefix_cache", False),
    (["--prefix-cache-gib", "0.25"], "prefix_cache_gib", 0.25),
    (["--encoder-cache-mb", "0"], "encoder_cache_mb", 0.0),
    (["--picture-cache-mb", "16"], "picture_cache_mb", 16.0),
    (["--enforce-eager"], "enforce_eager", True), (["--npu-graphs"], "npu_graphs", True),
    (["--backend", "remote"], "backend", "remote"),
    (["--remote-url", "http://h:1/v1"], "remote_url", "http://h:1/v1"),
    (["--remote-api-key", "k"], "remote_api_key", "k"), (["--remote-model", "m"], "remote_model", "m"),
    (["--remote-timeout", "9"], "remote_timeout", 9.0),
    (["--remote-min-pixels", "3136"], "remote_min_pixels", 3136),
    (["--remote-max-pixels", "100352"], "remote_max_pixels", 100352),
    (["--remote-mm-kwargs"], "remote_mm_kwargs", True),
]
API_FLAGS = [
    (["--auth", "a:b", "--auth", "c:d"], "auth", ["a:b", "c:d"]), (["--api-key", "sk"], "api_key", "sk"),
    (["--served-model-name", "x", "y"], "served_model_name", ["x", "y"]),
    (["--allowed-media-domains", "a.test", "b.test"], "allowed_media_domains",
     ["a.test", "b.test"]),
    (["--enable-tokenizer-info-endpoint"], "enable_tokenizer_info_endpoint", True),
    (["--enable-server-load-tracking"], "enable_server_load_tracking", True),
    (["--enable-prompt-tokens-details"], "enable_prompt_tokens_details", True),
    (["--allowed-local-media-path", "/tmp", "--allowed-local-media-path", "/srv"],
     "allowed_local_media_path", ["/tmp", "/srv"]),
    (["--max-body-mb", "3"], "max_body_mb", 3.0), (["--header-timeout", "4"], "header_timeout", 4.0),
    (["--body-timeout", "5"], "body_timeout", 5.0), (["--max-connections", "6"], "max_connections", 6),
    (["--forwarded-allow-ips", "*"], "forwarded_allow_ips", "*"),
    (["--max-client-requests", "0"], "max_client_requests", 0),
    (["--enable-auto-tool-choice"], "enable_auto_tool_choice", True),
    (["--tool-call-parser", "hermes"], "tool_call_parser", "hermes"),
]
WEB_FLAGS = [
    (["--server-name", "0.0.0.0"], "server_name", "0.0.0.0"),
    (["--server-port", "9000"], "server_port", 9000), (["--share"], "share", True),
    (["--max-upload-mb", "5"], "max_upload_mb", 5.0), (["--ui-concurrency", "2"], "ui_concurrency", 2),
    (["--root-path", "/p"], "root_path", "/p"), (["--upload-ttl-hours", "1"], "upload_ttl_hours", 1.0),
    (["--max-export-mb", "8"], "max_export_mb", 8.0),
    (["--feedback-file", "f.jsonl"], "feedback_file", "f.jsonl"),
    (["--log-level", "debug"], "log_level", "debug"),
]
SERVE_FLAGS = [(["--host", "0.0.0.0"], "host", "0.0.0.0"), (["--port", "9001"], "port", 9001),
               (["--log-level", "warning"], "log_level", "warning")]

# (variable, its text, where it lands, the parsed value)
ENGINE_ENV = [
    ("QWENVL_MODEL", "envmodel", "model", "envmodel"), ("QWENVL_DEVICE", "cpu", "device", "cpu"),
    ("QWENVL_DTYPE", "float32", "dtype", "float32"), ("QWENVL_ATTN", "eager", "attn_implementation", "eager"),
    ("QWENVL_MODELSCOPE", "yes", "modelscope", True), ("QWENVL_REVISION", "rev", "revision", "rev"),
    ("QWENVL_MAX_MODEL_LEN", "1000", "max_model_len", 1000),
    ("QWENVL_LIMIT_IMAGES", "4", "limit_images", 4), ("QWENVL_LIMIT_VIDEOS", "0", "limit_videos", 0),
    ("QWENVL_MAX_QUEUE", "3", "max_queue", 3), ("QWENVL_MAX_BATCH", "2", "max_batch", 2),
    ("QWENVL_DEFAULT_MAX_TOKENS", "9", "default_max_tokens", 9),
    ("QWENVL_CPU_THREADS", "2", "cpu_threads", 2), ("QWENVL_MAX_MEDIA_MB", "1.5", "max_media_mb", 1.5), ("QWENVL_MAX_LOGPROBS", "3", "max_logprobs", 3),
    ("QWENVL_MAX_IMAGE_PIXELS", "777", "max_image_pixels", 777),
    ("QWENVL_FETCH_TIMEOUT", "3", "fetch_timeout", 3.0),
    ("QWENVL_MAX_PIXELS_LIMIT", "888", "max_pixels_limit", 888),
    ("QWENVL_MAX_PROMPT_CHARS", "55", "max_prompt_chars", 55),
    ("QWENVL_VIDEO_FPS", "0.5", "video_fps", 0.5), ("QWENVL_VIDEO_MAX_FRAMES", "4", "video_max_frames", 4),
    ("QWENVL_VIDEO_MAX_PIXELS", "999", "video_max_pixels", 999),
    ("QWENVL_VIDEO_MAX_FPS", "5", "video_max_fps", 5.0),
    ("QWENVL_VIDEO_MAX_DECODED_PIXELS", "1234", "video_max_decoded_pixels", 1234),
    ("QWENVL_NO_WARMUP", "1", "warmup", False),
    ("QWENVL_LOG_STATS_INTERVAL", "2.5", "log_stats_interval", 2.5),
    ("QWENVL_KV_CACHE_GIB", "0.125", "kv_cache_gib", 0.125),
    ("QWENVL_MAX_NUM_BATCHED_TOKENS", "64", "max_num_batched_tokens", 64),
    ("QWENVL_NO_PREFIX_CACHE", "true", "prefix_cache", False),
    ("QWENVL_PREFIX_CACHE_GIB", "0.5", "prefix_cache_gib", 0.5),
    ("QWENVL_ENCODER_CACHE_MB", "12", "encoder_cache_mb", 12.0),
    ("QWENVL_PICTURE_CACHE_MB", "0", "picture_cache_mb", 0.0),
    ("QWENVL_ENFORCE_EAGER", "on", "enforce_eager", True), ("QWENVL_NPU_GRAPHS", "1", "npu_graphs", True),
    ("QWENVL_BACKEND", "remote", "backend", "remote"),
    ("QWENVL_REMOTE_URL", "http://r/v1", "remote_url", "http://r/v1"),
    ("QWENVL_REMOTE_API_KEY", "rk", "remote_api_key", "rk"),
    ("QWENVL_REMOTE_MODEL", "rm", "remote_model", "rm"),
    ("QWENVL_REMOTE_TIMEOUT", "30", "remote_timeout", 30.0),
    ("QWENVL_REMOTE_MIN_PIXELS", "100", "remote_min_pixels", 100),
    ("QWENVL_REMOTE_MAX_PIXELS", "200", "remote_max_pixels", 200),
    ("QWENVL_REMOTE_MM_KWARGS", "1", "remote_mm_kwargs", True),
]
API_ENV = [
    ("QWENVL_AUTH", "u:p", "auth", ["u:p"]), ("QWENVL_API_KEY", "ak", "api_key", "ak"),
    ("QWENVL_SERVED_MODEL_NAME", "a,b", "served_model_name", ["a", "b"]),
    ("QWENVL_ALLOWED_LOCAL_MEDIA_PATH", "/x,/y", "allowed_local_media_path", ["/x", "/y"]),
    ("QWENVL_ALLOWED_MEDIA_DOMAINS", "a.test,b.test", "allowed_media_domains",
     ["a.test", "b.test"]),
    ("QWENVL_ENABLE_TOKENIZER_INFO_ENDPOINT", "1", "enable_tokenizer_info_endpoint", True),
    ("QWENVL_ENABLE_SERVER_LOAD_TRACKING", "1", "enable_server_load_tracking", True),
    ("QWENVL_ENABLE_PROMPT_TOKENS_DETAILS", "1", "enable_prompt_tokens_details", True),
    ("QWENVL_MAX_BODY_MB", "2", "max_body_mb", 2.0),
    ("QWENVL_HEADER_TIMEOUT", "1.5", "header_timeout", 1.5),
    ("QWENVL_BODY_TIMEOUT", "2.5", "body_timeout", 2.5),
    ("QWENVL_MAX_CONNECTIONS", "10", "max_connections", 10),
    ("QWENVL_ENABLE_AUTO_TOOL_CHOICE", "1", "enable_auto_tool_choice", True),
    ("QWENVL_TOOL_CALL_PARSER", "hermes", "tool_call_parser", "hermes"),
    ("FORWARDED_ALLOW_IPS", "10.0.0.1", "forwarded_allow_ips", "10.0.0.1"),
    ("QWENVL_MAX_CLIENT_REQUESTS", "0", "max_client_requests", 0),
]
WEB_ENV = [
    ("GRADIO_SERVER_NAME", "0.0.0.0", "server_name", "0.0.0.0"),
    ("GRADIO_SERVER_PORT", "7999", "server_port", 7999), ("GRADIO_SHARE", "1", "share", True),
    ("QWENVL_MAX_UPLOAD_MB", "5", "max_upload_mb", 5.0),
    ("QWENVL_UI_CONCURRENCY", "3", "ui_concurrency", 3), ("GRADIO_ROOT_PATH", "/r", "root_path", "/r"),
    ("QWENVL_UPLOAD_TTL_HOURS", "0", "upload_ttl_hours", 0.0),
    ("QWENVL_MAX_EXPORT_MB", "1", "max_export_mb", 1.0),
    ("QWENVL_FEEDBACK_FILE", "fb.jsonl", "feedback_file", "fb.jsonl"),
    ("QWENVL_LOG_LEVEL", "error", "log_level", "error"),
]
SERVE_ENV = [("QWENVL_HOST", "::1", "host", "::1"), ("QWENVL_PORT", "8123", "port", 8123),
             ("QWENVL_LOG_LEVEL", "error", "log_level", "error")]
# Variables with a second spelling, or whose 0 means "not set" (None), or 0 itself.
OTHER_ENV = [
    ("VLLM_USE_MODELSCOPE", "True", "modelscope", True), ("QWENVL_SHARE", "1", "share", True),
    ("QWENVL_NO_WARMUP", "0", "warmup", True), ("QWENVL_CPU_THREADS", "0", "cpu_threads", None),
    ("QWENVL_MAX_PROMPT_CHARS", "0", "max_prompt_chars", None),
    ("QWENVL_PREFIX_CACHE_GIB", "0", "prefix_cache_gib", None),
    ("QWENVL_REMOTE_MIN_PIXELS", "0", "remote_min_pixels", None),
    ("QWENVL_REMOTE_MAX_PIXELS", "0", "remote_max_pixels", None),
    ("QWENVL_UI_CONCURRENCY", "0", "ui_concurrency", 0),
    ("QWENVL_MAX_CLIENT_REQUESTS", "7", "max_client_requests", 7),
]

DOORS = {
    "app": (app.build_parser, {**ENGINE_DEFAULTS, **WEB_DEFAULTS, **API_DEFAULTS},
            ENGINE_FLAGS + API_FLAGS + WEB_FLAGS, ENGINE_ENV + API_ENV + WEB_ENV),
    "server": (server_parser, {**SERVE_DEFAULTS, **ENGINE_DEFAULTS, **API_DEFAULTS},
               ENGINE_FLAGS + API_FLAGS + SERVE_FLAGS, ENGINE_ENV + API_ENV + SERVE_ENV),
}


def typed(values: dict) -> dict:
    """50 == 50.0 in Python; the parsers must give the same types too."""
    return {k: (type(v).__name__, v) for k, v in values.items()}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("QWENVL_", "GRADIO_", "VLLM_")) or name == "FORWARDED_ALLOW_IPS":
            monkeypatch.delenv(name)


@pytest.mark.parametrize("door", DOORS)
def test_an_empty_command_line_parses_as_before(door):
    build, defaults, _, _ = DOORS[door]
    assert typed(vars(build().parse_args([]))) == typed(defaults)


@pytest.mark.parametrize("door", DOORS)
def test_a_full_command_line_parses_as_before(door):
    build, defaults, flags, _ = DOORS[door]
    argv = [word for words, _, _ in flags for word in words]
    expected = {**defaults, **{dest: value for _, dest, value in flags}}
    assert set(expected) == set(defaults)       # every flag is given
    assert typed(vars(build().parse_args(argv))) == typed(expected)


@pytest.mark.parametrize("door", DOORS)
def test_every_environment_variable_sets_its_default(door, monkeypatch):
    build, defaults, _, variables = DOORS[door]
    for name, text, _, _ in variables:
        monkeypatch.setenv(name, text)
    expected = {**defaults, **{dest: value for _, _, dest, value in variables}}
    assert typed(vars(build().parse_args([]))) == typed(expected)
    # a flag still wins; a list flag adds to the variable's entries, as argparse's append does
    args = build().parse_args(["--max-batch", "6", "--auth", "z:z", "--served-model-name", "n",
                               "--allowed-local-media-path", "/q"])
    assert (args.max_batch, args.auth, args.served_model_name, args.allowed_local_media_path) \
        == (6, ["u:p", "z:z"], ["n"], ["/x", "/y", "/q"])


@pytest.mark.parametrize("name,text,dest,value", OTHER_ENV)
def test_second_spellings_and_zeros_in_the_environment(monkeypatch, name, text, dest, value):
    monkeypatch.setenv(name, text)
    assert typed({dest: getattr(app.build_parser().parse_args([]), dest)}) == typed({dest: value})


def test_a_bad_number_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("QWENVL_MAX_BATCH", "eight")
    with pytest.raises(ValueError, match="QWENVL_MAX_BATCH='eight' is not a valid int"):
        app.build_parser()


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--log-level", "loud"],
                                  ["--header-timeout", "0"], ["--max-connections", "-1"],
                                  ["--served-model-name"], ["--max-batch", "many"]])
def test_bad_flags_are_refused_as_before(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        app.build_parser().parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def help_of(text: str) -> dict[str, str]:
    """--help's text per option: the option's line and its indented continuation."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            current = [line]
            for option in re.findall(r"-{1,2}[\w-]+", re.split(r"\s{2,}", line.strip())[0]):
                blocks[option] = current
        elif line.startswith("   "):
            current.append(line)
        else:
            current = []
    return {k: re.sub(r"\s+", " ", " ".join(v)) for k, v in blocks.items()}


@pytest.mark.parametrize("door", DOORS)
def test_help_names_each_flags_environment_variable(door):
    build, _, flags, variables = DOORS[door]
    parser = build()
    blocks = help_of(parser.format_help())
    by_dest = {dest: words[0] for words, dest, _ in flags}
    for name, _, dest, _ in variables + [v for v in OTHER_ENV if v[2] in by_dest]:
        assert name in blocks[by_dest[dest]], (by_dest[dest], name)


def generator():
    spec = importlib.util.spec_from_file_location("configuration_doc",
                                                  ROOT / "docs" / "configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_manual_is_the_generated_one():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generator().render(), \
        "docs/configuration.md is stale: run .venv/bin/python docs/configuration.py"


def test_the_manual_lists_every_flag_and_variable():
    manual = (ROOT / "docs" / "configuration.md").read_text()
    for door in DOORS.values():
        for words, _, _ in door[2]:
            assert f"`{words[0]}" in manual, words[0]
        for name, *_ in door[3]:
            assert f"`{name}" in manual, name
    for name, *_ in OTHER_ENV:
        assert f"`{name}" in manual, name


@pytest.mark.parametrize("main", [app.main, server_main], ids=["app", "server"])
def test_remote_without_url_is_refused_before_loading(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--backend", "remote", "--port" if main is server_main else "--server-port", "0"])
    assert exc.value.code == 2
    assert "--backend remote needs --remote-url" in capsys.readouterr().err


@pytest.mark.parametrize("main,flag", [(app.main, "--server-port"), (server_main, "--port")],
                         ids=["app", "server"])
def test_both_doors_refuse_a_taken_port_before_loading(main, flag, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit) as exc:
            main(["--model", "tiny", flag, str(s.getsockname()[1])])
    assert exc.value.code == 2
    assert f"choose another {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("main", [app.main, server_main], ids=["app", "server"])
def test_both_doors_refuse_an_unreadable_login(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--auth", "nocolon", "--port" if main is server_main else "--server-port", "0"])
    assert exc.value.code == 2 and "USER:PASS" in capsys.readouterr().err
