"""Image and URL handling: every odd file is either converted or refused with
one clear line, and no URL can make the server fetch a private address.
Network access is stubbed: nothing here leaves the machine."""

from __future__ import annotations

import base64
import io
import socket
import threading

import httpx
import pytest
from PIL import Image

from engine.inputs import media
from engine.errors import InvalidRequestError
from engine.inputs.media import MediaPolicy, load_image

API_POLICY = MediaPolicy(local_roots=())


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (64, 48), (255, 0, 0, 128)),
    lambda: Image.new("CMYK", (64, 48), (0, 255, 0, 0)),
    lambda: Image.new("I;16", (64, 48), 40000),
    lambda: Image.new("LA", (64, 48), (10, 20)),
    lambda: Image.new("P", (64, 48), 3),
    lambda: Image.new("L", (1, 1), 7),
])
def test_odd_modes_become_rgb(make):
    img = make()
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    out = load_image(data_uri(png_bytes(img, fmt)), API_POLICY)
    assert out.mode == "RGB" and out.size == img.size


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = load_image(data_uri(buf.getvalue(), "image/gif"), API_POLICY)
    assert out.getpixel((5, 5))[0] > 200


@pytest.mark.parametrize("raw,message", [
    (b"", "is not a readable image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "is not a readable image"),
    (png_bytes(Image.new("RGB", (300, 300)))[:120], "truncated or corrupt"),
    (png_bytes(Image.new("RGB", (300, 300)), "JPEG")[:400], "readable image|truncated or corrupt"),
])
def test_unreadable_bytes(raw, message):
    with pytest.raises(InvalidRequestError, match=message):
        load_image(data_uri(raw), API_POLICY)


def test_decompression_bomb_refused_before_decoding():
    bomb = png_bytes(Image.new("1", (20000, 20000)))
    with pytest.raises(InvalidRequestError, match=r"is too large: at most 64,000,000 pixels"):
        load_image(data_uri(bomb), API_POLICY)


def test_extreme_aspect_ratio():
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        load_image(data_uri(png_bytes(Image.new("RGB", (4000, 10)))), API_POLICY)


def test_broken_base64():
    with pytest.raises(InvalidRequestError, match="Invalid base64"):
        load_image("data:image/png;base64,iVBORw0KGgo!!!", API_POLICY)


def test_local_files_refused_for_api_policy(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(p)
    for src in (str(p), f"file://{p}", "file:///etc/passwd", "/etc/passwd", "../../etc/passwd"):
        with pytest.raises(InvalidRequestError, match="not allowed"):
            load_image(src, API_POLICY)
    # an allowed folder opens its own files, and nothing outside it (no ../ escape)
    allowed = MediaPolicy(local_roots=(tmp_path,))
    assert load_image(f"file://{p}", allowed).size == (8, 8)
    with pytest.raises(InvalidRequestError, match="not allowed"):
        load_image(str(tmp_path / ".." / ".." / "etc" / "passwd"), allowed)


class LoopbackListener:
    """A TCP listener on 127.0.0.1 that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def test_loopback_names_refused_without_connecting():
    listener = LoopbackListener()
    try:
        for host in ("127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]",
                     "0x7f000001"):
            with pytest.raises(InvalidRequestError, match="Refusing to fetch|Cannot resolve"):
                load_image(f"http://{host}:{listener.port}/img.png", API_POLICY)
    finally:
        listener.close()
    assert listener.connections == 0


@pytest.fixture
def no_network(monkeypatch):
    """A fake DNS and an in-memory HTTP transport: nothing can leave the machine."""
    dns = {"public.test": ["93.184.216.34"], "internal.test": ["10.0.0.5"],
           "mixed.test": ["93.184.216.34", "192.168.1.1"], "metadata.test": ["169.254.169.254"]}
    requests: list[str] = []
    png = png_bytes(Image.new("RGB", (40, 30), (1, 2, 3)))

    def resolve(host, port):
        try:
            return dns[host] if host in dns else [str(__import__("ipaddress").ip_address(host))]
        except ValueError:
            raise OSError("no such host") from None

    def handler(request: httpx.Request) -> httpx.Response:
        # the fetch connects to the checked address; the name travels in the Host header
        requests.append(str(request.url.copy_with(host=request.headers["host"])))
        path = request.url.path
        if path == "/redirect-private":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})
        if path == "/redirect-ok":
            return httpx.Response(302, headers={"location": "/img.png"})
        if path == "/huge":
            return httpx.Response(200, content=b"\0" * 2048)
        return httpx.Response(200, content=png, headers={"content-type": "image/png"})

    real_client = httpx.Client
    monkeypatch.setattr(media, "resolve_host", resolve)
    monkeypatch.setattr(httpx, "Client",
                        lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    return requests


def test_public_url_fetched_and_redirect_followed(no_network):
    assert load_image("http://public.test/img.png", API_POLICY).size == (40, 30)
    assert load_image("https://public.test/redirect-ok", API_POLICY).size == (40, 30)
    assert no_network == ["http://public.test/img.png", "https://public.test/redirect-ok",
                          "https://public.test/img.png"]


@pytest.mark.parametrize("url", [
    "http://internal.test/img.png", "http://mixed.test/img.png", "http://metadata.test/",
    "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/x.png", "http://[fd00::1]/x.png",
    "http://[fe80::1]/x.png", "http://0.0.0.0/x.png",
])
def test_private_addresses_refused_without_request(no_network, url):
    with pytest.raises(InvalidRequestError, match="Refusing to fetch"):
        load_image(url, API_POLICY)
    assert no_network == []


def test_redirect_to_private_is_checked_again(no_network):
    with pytest.raises(InvalidRequestError, match="Refusing to fetch '169.254.169.254'"):
        load_image("http://public.test/redirect-private", API_POLICY)
    assert no_network == ["http://public.test/redirect-private"]


def test_allowed_media_domains_fetch_listed_hosts_even_private(no_network):
    """--allowed-media-domains: a listed host is fetched even on a private address (an
    intranet's picture server), at the address that was checked; any other host is refused
    before a request, naming it; redirects are held to the list too."""
    policy = MediaPolicy(local_roots=(), allowed_domains=("internal.test", "PUBLIC.test"))
    assert load_image("http://internal.test/img.png", policy).size == (40, 30)
    assert load_image("http://public.test/img.png", policy).size == (40, 30)
    assert no_network == ["http://internal.test/img.png", "http://public.test/img.png"]
    for url, host in [("http://mixed.test/img.png", "mixed.test"),
                      ("http://10.0.0.5/img.png", "10.0.0.5"),
                      ("https://public.test.evil/x.png", "public.test.evil")]:
        with pytest.raises(InvalidRequestError, match=rf"allowed domains: \['internal.test', "
                                                      rf"'PUBLIC.test'\]. Input URL domain: "
                                                      rf"{host}$"):
            load_image(url, policy)
    with pytest.raises(InvalidRequestError, match="Input URL domain: 169.254.169.254"):
        load_image("http://public.test/redirect-private", policy)
    assert len(no_network) == 3


def test_without_allowed_domains_the_guard_is_unchanged(no_network):
    with pytest.raises(InvalidRequestError, match="Refusing to fetch 'internal.test'"):
        load_image("http://internal.test/img.png", MediaPolicy(local_roots=()))
    assert no_network == []


def test_allowed_media_domains_flag_reaches_the_api_policy(monkeypatch):
    import argparse

    from server.settings import ServerSettings, add_server_args

    def settings(*argv: str) -> ServerSettings:
        parser = argparse.ArgumentParser()
        add_server_args(parser)
        return ServerSettings.from_namespace(parser.parse_args(list(argv)))

    assert settings().media_policy().allowed_domains is None
    assert settings("--allowed-media-domains", "a.test,b.test", "c.test").media_policy() \
        .allowed_domains == ("a.test", "b.test", "c.test")
    monkeypatch.setenv("QWENVL_ALLOWED_MEDIA_DOMAINS", "intranet.local")
    assert settings().media_policy().allowed_domains == ("intranet.local",)


def test_listed_loopback_host_is_really_fetched(monkeypatch):
    """End to end on loopback: a listed name that resolves to 127.0.0.1 is fetched from a
    real server there; unlisted, the same server is refused without a connection."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = png_bytes(Image.new("RGB", (20, 10), (9, 9, 9)))
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(media, "resolve_host", lambda host, port: ["127.0.0.1"])
    try:
        url = f"http://pictures.intranet:{server.server_port}/a.png"
        policy = MediaPolicy(local_roots=(), allowed_domains=("pictures.intranet",))
        assert load_image(url, policy).size == (20, 10)
        assert seen == [f"pictures.intranet:{server.server_port}"]
        with pytest.raises(InvalidRequestError, match="Refusing to fetch"):
            load_image(url, API_POLICY)
        assert len(seen) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_download_size_cap(no_network):
    with pytest.raises(InvalidRequestError, match="larger than the limit"):
        load_image("http://public.test/huge", MediaPolicy(local_roots=(), max_bytes=1024))


def test_unknown_scheme():
    for url in ("ftp://public.test/a.png", "gopher://x/", "javascript:alert(1)"):
        with pytest.raises(InvalidRequestError, match="Unsupported URL scheme"):
            load_image(url, API_POLICY)


def test_media_limits_come_from_the_engine_config():
    """No process-wide state: each engine's input stage applies its own config's limits."""
    import base64 as b64

    from engine.config import EngineConfig
    from engine.inputs.stage import InputStage
    from engine.types import Conversation, GenerationRequest, ImageInput, Message

    data = png_bytes(Image.new("RGB", (40, 30), (1, 2, 3)))
    uri = "data:image/png;base64," + b64.b64encode(data).decode()
    req = GenerationRequest(Conversation([Message("user", "x", images=[ImageInput(uri)])]))
    strict = InputStage(EngineConfig(max_media_mb=len(data) / 2 / 2**20))
    with pytest.raises(InvalidRequestError, match="larger than the limit"):
        strict.load(req, MediaPolicy(local_roots=()), 16384)
    few_pixels = InputStage(EngineConfig(max_image_pixels=1000))
    with pytest.raises(InvalidRequestError, match="too large"):
        few_pixels.load(req, MediaPolicy(local_roots=()), 16384)
    loaded = InputStage(EngineConfig()).load(req, MediaPolicy(local_roots=()), 16384)
    picture = loaded[0].parts[0]          # scaled up to the tutorial's 224x224 minimum
    assert picture.picture.size == (280, 196) and picture.tokens == 70
