"""Turning an image or video reference into something the processor can take,
safely: bounded size and time, no decompression bombs, and no server-side
request forgery (private, loopback and link-local hosts are refused, and every
redirect is checked again before it is followed).

Everything that touches the network goes through `resolve_host` and
`fetch_url`; tests replace them so that nothing leaves the machine.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import EngineConfig
from ..errors import InvalidRequestError
from .geometry import MAX_RATIO

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may point at.

    `local_roots=None` lets any local path through (the CLI, trusted callers);
    the UI allows its upload folder and assets/, an API request gets `()` (no
    local files) or the folders named by `--allowed-local-media-path`, and the hosts named
    by `--allowed-media-domains`. The size and time limits are the engine's (`with_limits`,
    from its EngineConfig).
    """

    local_roots: tuple[Path, ...] | None = None
    allow_private_hosts: bool = False
    # --allowed-media-domains: when set, only URLs on these hosts are fetched, and they may
    # be on loopback or a private network (an intranet's picture server); None: any public host
    allowed_domains: tuple[str, ...] | None = None
    timeout_s: float = EngineConfig.fetch_timeout
    max_bytes: int = int(EngineConfig.max_media_mb * 1024 * 1024)
    max_image_pixels: int = EngineConfig.max_image_pixels
    max_redirects: int = 3

    def with_limits(self, max_media_mb: float | None = None, max_image_pixels: int | None = None,
                    fetch_timeout_s: float | None = None) -> "MediaPolicy":
        """A copy with the given limits (None keeps the current one)."""
        return replace(self, max_bytes=int(max_media_mb * 1024 * 1024) if max_media_mb
                       else self.max_bytes,
                       max_image_pixels=int(max_image_pixels or self.max_image_pixels),
                       timeout_s=float(fetch_timeout_s or self.timeout_s))

    def allows_local(self, path: Path) -> bool:
        if self.local_roots is None:
            return True
        real = path.resolve()
        return any(real.is_relative_to(root.resolve()) for root in self.local_roots)


@dataclass(frozen=True)
class NamedMedia:
    """An image or video source with vLLM's multimodal `uuid`: the input stage remembers
    what a uuid named, so a later part may leave its source out (None) and reuse it."""

    uuid: str
    source: str | None = None


# --------------------------------------------------------------------------- network
def resolve_host(host: str, port: int) -> list[str]:
    """All addresses a host name resolves to (replaced by tests)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


def _is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


def check_allowed_domain(host: str, allowed: tuple[str, ...] | None) -> bool:
    """True when `host` is on the --allowed-media-domains list; a host off a list that is set
    is refused in vLLM's words (with its host named); False when no list is set."""
    if allowed is None:
        return False
    name = host.lower().rstrip(".")
    if name not in {d.lower().rstrip(".") for d in allowed}:
        raise InvalidRequestError(
            f"The URL must be from one of the allowed domains: {list(allowed)}. Input URL "
            f"domain: {host}", param="url")
    return True


def check_url_host(url: str, policy: MediaPolicy) -> str | None:
    """Refuse URLs whose host is off the allowed list (when one is set) or is, or resolves
    to, a non-public address (unless it is on that list). Returns the address that passed
    (the one to connect to), or None when private hosts are allowed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidRequestError(f"Unsupported URL scheme {parts.scheme!r}: use http(s) or data:",
                                  param="url")
    host = parts.hostname
    if not host:
        raise InvalidRequestError("The image URL has no host.", param="url")
    listed = check_allowed_domain(host, policy.allowed_domains)
    if policy.allow_private_hosts:
        return None
    try:
        addrs = resolve_host(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        raise InvalidRequestError(f"Cannot resolve host {host!r}: {exc}", param="url") from None
    if listed and addrs:
        return addrs[0].split("%", 1)[0]
    if not addrs or not all(_is_public(a) for a in addrs):
        raise InvalidRequestError(
            f"Refusing to fetch {host!r}: private, loopback, link-local and metadata addresses "
            "are not allowed.", param="url")
    return addrs[0].split("%", 1)[0]


def pinned_request(url: str, addr: str | None) -> tuple[str, dict, dict]:
    """(url, headers, extensions) that connect to `addr`, the address that passed the check,
    instead of resolving the name again (DNS rebinding could answer a private address the
    second time). The Host header and the TLS name (SNI and certificate check) stay the
    original host's."""
    if addr is None:
        return url, {}, {}
    parts = urllib.parse.urlsplit(url)
    literal = f"[{addr}]" if ":" in addr else addr
    netloc = literal + (f":{parts.port}" if parts.port else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    pinned = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return pinned, {"Host": host_header}, extensions


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET a URL with a timeout and a size cap, re-checking the host at every redirect and
    connecting to the address that was checked."""
    import httpx

    for _ in range(policy.max_redirects + 1):
        target, headers, extensions = pinned_request(url, check_url_host(url, policy))
        try:
            with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
                with client.stream("GET", target, headers=headers,
                                   extensions=extensions) as resp:
                    if resp.is_redirect:
                        url = urllib.parse.urljoin(url, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        raise InvalidRequestError(
                            f"Fetching the media URL failed: HTTP {resp.status_code}", param="url")
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > policy.max_bytes:
                        raise _too_big(policy)
                    buf = bytearray()
                    for chunk in resp.iter_bytes():
                        buf += chunk
                        if len(buf) > policy.max_bytes:
                            raise _too_big(policy)
                    return bytes(buf)
        except httpx.TimeoutException:
            raise InvalidRequestError(
                f"Fetching the media URL timed out after {policy.timeout_s:g} s.", param="url") from None
        except httpx.HTTPError as exc:
            raise InvalidRequestError(f"Fetching the media URL failed: {exc}", param="url") from None
    raise InvalidRequestError("Too many redirects while fetching the media URL.", param="url")


def _too_big(policy: MediaPolicy) -> InvalidRequestError:
    return InvalidRequestError(
        f"The media file is larger than the limit of {policy.max_bytes // (1024 * 1024)} MB.",
        param="url")


# --------------------------------------------------------------------------- bytes
def decode_data_uri(uri: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise InvalidRequestError("Malformed data: URI (no comma).", param="url")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_big(policy)
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError("Invalid base64 in data: URI.", param="url") from None
    return urllib.parse.unquote_to_bytes(payload)


def _local_path(source: str, policy: MediaPolicy) -> Path:
    if source.startswith("file://"):
        parsed = urllib.parse.urlsplit(source)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequestError("file:// URLs must name a local path.", param="url")
        path = Path(urllib.parse.unquote(parsed.path))
    else:
        path = Path(source).expanduser()
    if not policy.allows_local(path):
        raise InvalidRequestError(
            "Local files and file:// URLs are not allowed here (see --allowed-local-media-path).",
            param="url")
    if not path.is_file():
        raise InvalidRequestError(f"File not found: {path}", param="url")
    if path.stat().st_size > policy.max_bytes:
        raise _too_big(policy)
    return path


def read_source_bytes(source: str, policy: MediaPolicy) -> tuple[bytes | None, Path | None, str]:
    """(bytes, path, display name) for a string source: exactly one of bytes/path is set."""
    if source.startswith("data:"):
        return decode_data_uri(source, policy), None, "data: URI"
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_url(source, policy), None, source
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = _local_path(source, policy)
        return None, path, path.name
    raise InvalidRequestError(f"Unsupported URL scheme {scheme!r}: use http(s) or data:",
                              param="url")


# --------------------------------------------------------------------------- images
def _to_rgb(img: Image.Image) -> Image.Image:
    """One RGB frame from any mode: alpha on white, CMYK, palettes, 16-bit, first GIF frame."""
    img = ImageOps.exif_transpose(img) or img
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def open_image(data: bytes | None, path: Path | None, name: str, policy: MediaPolicy) -> Image.Image:
    """Decode and validate one image; every failure is a one-line InvalidRequestError."""
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
    except Image.DecompressionBombError:
        raise _bomb(name, None, policy) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequestError(
            f"Failed to load image: {name} is not a readable image "
            f"(supported: {', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}).",
            param="image") from None
    w, h = img.size
    if w * h > policy.max_image_pixels:
        raise _bomb(name, (w, h), policy)
    if w < 1 or h < 1:
        raise InvalidRequestError(f"Failed to load image: {name} is empty.", param="image")
    if max(w, h) / min(w, h) > MAX_RATIO:
        raise InvalidRequestError(
            f"Image {name} is {w}x{h}: the aspect ratio must be at most {MAX_RATIO}.",
            param="image")
    try:
        img.load()
        return _to_rgb(img)
    except Image.DecompressionBombError:
        raise _bomb(name, (w, h), policy) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequestError(f"Failed to load image: {name} is truncated or corrupt ({exc}).",
                                  param="image") from None


def _bomb(name: str, size: tuple[int, int] | None, policy: MediaPolicy) -> InvalidRequestError:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return InvalidRequestError(
        f"Image {name}{dims} is too large: at most {policy.max_image_pixels:,} pixels are allowed.",
        param="image")


def load_image(source: Any, policy: MediaPolicy | None = None) -> Image.Image:
    """A validated RGB PIL image from a path, file:// or data: URI, http(s) URL or PIL image.
    Without a policy: a trusted caller (any local file), with the process-wide limits."""
    policy = policy or MediaPolicy()
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > policy.max_image_pixels:
            raise _bomb("image", (w, h), policy)
        return _to_rgb(source)
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise InvalidRequestError("An image must be a path, a URL or a data: URI.", param="image")
    data, path, name = read_source_bytes(source.strip(), policy)
    return open_image(data, path, name, policy)


# --------------------------------------------------------------------------- videos
@dataclass
class VideoFile:
    """A video made local (temp file for URLs and data URIs), deleted by `close()`."""

    path: Path
    _temp: bool = False

    def close(self) -> None:
        if self._temp:
            self.path.unlink(missing_ok=True)


def load_video(source: Any, policy: MediaPolicy | None = None) -> VideoFile:
    """A local, checked video file: its container must open and hold a video stream whose
    frames are pictures within the picture limit (checked before any frame is decoded)."""
    policy = policy or MediaPolicy()
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise InvalidRequestError("A video must be a path, a URL or a data: URI.", param="video")
    data, path, name = read_source_bytes(source.strip(), policy)
    temp = False
    if data is not None:
        fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix="qwenvl-video-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        path, temp = Path(tmp), True
    assert path is not None
    video = VideoFile(path, temp)
    try:
        size = _video_frame_size(path, name)
        check_video_frame(f"Video {name}", size, policy.max_image_pixels)
    except BaseException:
        video.close()
        raise
    return video


def _video_frame_size(path: Path, name: str) -> tuple[int, int]:
    """(width, height) of the first video stream as its header states them (0 where it
    states none: each decoded frame is checked again)."""
    try:
        import av

        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            ctx = container.streams.video[0].codec_context
            return int(ctx.width or 0), int(ctx.height or 0)
    except Exception:
        raise InvalidRequestError(
            f"Failed to load video: {name} is not a readable video "
            f"(supported: {', '.join(s.lstrip('.') for s in VIDEO_SUFFIXES)}).",
            param="video") from None


def check_video_frame(what: str, size: tuple[int, int], max_pixels: int) -> None:
    """A video frame is a picture: refused, before it is decoded, past the picture limit
    (--max-image-pixels) or the aspect ratio pictures are held to. `what`: the sentence's
    subject ("Video clip.mp4")."""
    w, h = size
    if w * h > max_pixels:
        raise InvalidRequestError(
            f"{what} has {w}x{h} frames: at most {max_pixels:,} pixels per frame are "
            f"allowed (see --max-image-pixels).", param="video")
    if w > 0 and h > 0 and max(w, h) / min(w, h) > MAX_RATIO:
        raise InvalidRequestError(
            f"{what} has {w}x{h} frames: the aspect ratio must be at most {MAX_RATIO}.",
            param="video")
