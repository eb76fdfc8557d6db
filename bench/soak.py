"""Memory soak: the API server (`python -m server`) in a subprocess on a free
loopback port, hammered with concurrent image requests, its resident memory
(VmRSS from /proc/PID/status) read after every round or phase. A server whose
memory keeps growing under a steady load fails here.

    python bench/soak.py --mode rounds [--clients 8 --rounds 12 --requests-per-round 80]
    python bench/soak.py --mode load [--clients 32 --phase-seconds 25]
    python bench/soak.py --mode rounds --server-arg=--max-batch --server-arg=1 \\
                         --env MALLOC_ARENA_MAX=1

rounds: N concurrent clients, each request a chat completion (not streamed)
with one 640x480 PNG as a data: URI (a few distinct, deterministic images);
goal: RSS after the last round within --goal-mb of round 2 (round 1 includes
lazy initialisation). load: N streaming clients with images, a quarter of them
hanging up mid-stream, --phases (2) phases; goal: growth phase 1 -> the last within
--goal-mb. The exit code is 0 unless the server fails (does not start, dies,
or stops answering /health); the goals are reported as PASS/FAIL lines."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.api import _free_port, chat_body, stream_chat  # noqa: E402
from bench.common import ROOT  # noqa: E402

IMAGE_SIZE = (640, 480)
DISCONNECT_AFTER_CHUNKS = 4
DISCONNECT_MAX_TOKENS = 2000       # long enough that the client leaves mid-stream
MAX_REQUESTS_PER_CLIENT_PHASE = 10_000   # a bound on every client loop besides its deadline


# --------------------------------------------------------------------------- images
def make_png_uri(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> str:
    """A deterministic, photo-like PNG (smooth colour blobs plus noise: it compresses about
    as badly as a photo does) as a data: URI."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- the server
def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (MB) and Threads of a process, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


class ServerProcess:
    """`python -m server` on a free loopback port, its output in a log file."""

    def __init__(self, model: str, warmup: bool, extra_args: list[str],
                 extra_env: dict[str, str], start_timeout: float) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "server", "--host", "127.0.0.1",
                     "--port", str(self.port), "--model", model, "--log-level", "warning",
                     *([] if warmup else ["--no-warmup"]), *extra_args]
        self.env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **extra_env}
        self.start_timeout = start_timeout
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="soak-server-", suffix=".log",
                                               delete=False)
        self.proc: subprocess.Popen | None = None
        self.cwd: Path = ROOT                               # the checkout whose server runs
        self.preexec_fn: Callable[[], None] | None = None   # e.g. limits set in the child

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout:g} s:\n"
                           + self.log_tail())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        import httpx

        try:
            return self.alive() and httpx.get(f"{self.base}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def status(self) -> dict[str, int]:
        assert self.proc is not None
        return read_status(self.proc.pid)

    def model_id(self) -> str:
        import httpx

        return httpx.get(f"{self.base}/v1/models", timeout=30).json()["data"][0]["id"]

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-chars:].decode(errors="replace")


def settle(server: ServerProcess, seconds: float) -> dict[str, int]:
    """Memory once the server is idle: give it `seconds` to finish cancelled rows."""
    time.sleep(seconds)
    return server.status()


# --------------------------------------------------------------------------- clients
@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, error: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if error is not None and len(self.errors) < 20:
                self.errors.append(error)


def complete_once(client, base: str, body: dict) -> str:
    """One chat completion, not streamed: 'ok' or 'busy' (429/503); raises on anything else."""
    resp = client.post(f"{base}/v1/chat/completions", json=body)
    if resp.status_code in (429, 503):
        return "busy"
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
    data = resp.json()
    if not data.get("choices"):
        raise RuntimeError(f"no choices: {str(data)[:200]}")
    return "ok"


def stream_and_hang_up(client, base: str, body: dict) -> str:
    """A streamed completion the client abandons after a few chunks (closing the response
    drops the connection): 'disconnected', 'finished' (ended first) or 'busy'."""
    chunks = 0
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status_code in (429, 503):
            resp.read()
            return "busy"
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:200]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line[6:] == "[DONE]":
                return "finished"
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("choices"):
                chunks += 1
                if chunks >= DISCONNECT_AFTER_CHUNKS:
                    return "disconnected"
    return "finished"


def run_round(base: str, bodies: list[dict], clients: int, requests: int,
              timeout_s: float, request_timeout: float) -> tuple[Tally, float]:
    """`requests` non-streamed requests shared by `clients` closed-loop clients."""
    import httpx

    tally = Tally()
    taken = iter(range(requests))
    take_lock = threading.Lock()
    start = time.monotonic()
    deadline = start + timeout_s

    def client() -> None:
        with httpx.Client(timeout=request_timeout) as http:
            for _ in range(requests):           # bounded: at most every request of the round
                if time.monotonic() > deadline:
                    tally.add("timed out")
                    return
                with take_lock:
                    i = next(taken, None)
                if i is None:
                    return
                try:
                    outcome = complete_once(http, base, bodies[i % len(bodies)])
                except Exception as exc:     # counted and printed, never hidden
                    tally.add("error", f"{type(exc).__name__}: {exc}")
                    continue
                tally.add(outcome)
                if outcome == "busy":
                    time.sleep(0.1)

    run_clients(lambda i: client(), clients, "soak-client", deadline, request_timeout)
    return tally, time.monotonic() - start


def run_clients(client, count: int, name: str, until: float, request_timeout: float) -> None:
    """`count` client threads (each called with its index), joined by `until` plus one
    request's time at most (all are daemons: a stuck one cannot hold the script)."""
    threads = [threading.Thread(target=client, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, until - time.monotonic()) + request_timeout)


def run_phase(base: str, bodies: list[dict], long_bodies: list[dict], clients: int,
              seconds: float, request_timeout: float) -> tuple[Tally, float]:
    """`clients` streaming clients for `seconds`; every fourth hangs up mid-stream."""
    import httpx

    tally = Tally()
    start = time.monotonic()
    stop_at = start + seconds

    def client(i: int) -> None:
        hang_up = i % 4 == 0
        with httpx.Client(timeout=request_timeout) as http:
            for n in range(MAX_REQUESTS_PER_CLIENT_PHASE):
                if time.monotonic() >= stop_at:
                    return
                try:
                    if hang_up:
                        outcome = stream_and_hang_up(http, base,
                                                     long_bodies[(i + n) % len(long_bodies)])
                    else:
                        res = stream_chat(http, base, bodies[(i + n) % len(bodies)])
                        outcome = "completed" if res.finish_reason == "length" else "short"
                except RuntimeError as exc:
                    if "HTTP 503" in str(exc) or "HTTP 429" in str(exc):
                        outcome = "busy"
                    else:
                        tally.add("error", f"{type(exc).__name__}: {exc}")
                        continue
                except Exception as exc:
                    tally.add("error", f"{type(exc).__name__}: {exc}")
                    continue
                tally.add(outcome)
                if outcome == "busy":
                    time.sleep(0.1)     # a polite client backs off before retrying

    run_clients(client, clients, "soak-stream", stop_at, request_timeout)
    return tally, time.monotonic() - start


# --------------------------------------------------------------------------- modes
def fmt_status(st: dict[str, int]) -> str:
    return f"rss {st['VmRSS']} MB (peak {st['VmHWM']} MB), {st['Threads']} threads"


def print_tally(tally: Tally) -> str:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(tally.counts.items()))
    for err in tally.errors[:3]:
        print(f"    error: {err}", flush=True)
    return parts or "no requests"


def verdict(name: str, growth: float, goal: float) -> bool:
    ok = growth <= goal
    print(f"{'PASS' if ok else 'FAIL'}: {name}: {growth:+.0f} MB (goal <= {goal:g} MB)", flush=True)
    return ok


def mode_rounds(server: ServerProcess, args: argparse.Namespace, uris: list[str]) -> bool:
    model = server.model_id()
    bodies = []
    for uri in uris:
        body = chat_body(model, args.max_tokens, uri)
        body.pop("stream_options")
        body["stream"] = False
        bodies.append(body)
    st = server.status()
    print(f"start: {fmt_status(st)}", flush=True)
    per_round: list[int] = []
    for r in range(1, args.rounds + 1):
        tally, wall = run_round(server.base, bodies, args.clients, args.requests_per_round,
                                args.round_timeout, args.request_timeout)
        st = settle(server, args.settle_seconds)
        prev = per_round[-1] if per_round else None
        per_round.append(st["VmRSS"])
        delta = f" ({st['VmRSS'] - prev:+d})" if prev is not None else ""
        print(f"round {r:2d}: {fmt_status(st)}{delta}, {wall:.1f} s, {print_tally(tally)}",
              flush=True)
        if not server.alive():
            raise RuntimeError("the server died:\n" + server.log_tail())
    ref = 2 if len(per_round) >= 2 else 1
    growth = per_round[-1] - per_round[ref - 1]
    print(f"rounds: RSS round {len(per_round)} {per_round[-1]} MB vs round {ref} "
          f"{per_round[ref - 1]} MB", flush=True)
    return verdict(f"rounds: RSS growth round {ref} -> round {len(per_round)}", growth,
                   args.goal_mb)


def mode_load(server: ServerProcess, args: argparse.Namespace, uris: list[str]) -> bool:
    model = server.model_id()
    bodies = [chat_body(model, args.max_tokens, uri) for uri in uris]
    long_bodies = [dict(b, max_tokens=DISCONNECT_MAX_TOKENS) for b in bodies]
    import httpx

    with httpx.Client(timeout=args.request_timeout) as http:   # lazy initialisation
        stream_chat(http, server.base, bodies[0])
    st = settle(server, args.settle_seconds)
    print(f"start: {fmt_status(st)}", flush=True)
    after: list[int] = []
    for phase in range(1, args.phases + 1):
        tally, wall = run_phase(server.base, bodies, long_bodies, args.clients,
                                args.phase_seconds, args.request_timeout)
        st = settle(server, args.settle_seconds)
        after.append(st["VmRSS"])
        print(f"phase {phase}: {fmt_status(st)}, {wall:.1f} s, {print_tally(tally)}", flush=True)
        if not server.alive():
            raise RuntimeError("the server died:\n" + server.log_tail())
    return verdict(f"load: RSS growth phase 1 -> phase {len(after)}", after[-1] - after[0],
                   args.goal_mb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["rounds", "load"], default="rounds")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--warmup", action="store_true",
                        help="let the server warm up (default: --no-warmup)")
    parser.add_argument("--clients", type=int, default=None,
                        help="concurrent clients (default: 8 in rounds mode, 32 in load mode)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests-per-round", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--phase-seconds", type=float, default=25.0)
    parser.add_argument("--phases", type=int, default=2,
                        help="load mode: phases (the goal compares the first and the last)")
    parser.add_argument("--images", type=int, default=4, help="distinct images")
    parser.add_argument("--goal-mb", type=float, default=100.0)
    parser.add_argument("--settle-seconds", type=float, default=1.0,
                        help="idle time before each RSS reading")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `python -m server` (repeatable; "
                             "--server-arg=--max-batch --server-arg=1)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the server (repeatable)")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = 8 if args.mode == "rounds" else 32
    if min(args.clients, args.rounds, args.requests_per_round, args.images) < 1 or args.phases < 2:
        parser.error("--clients, --rounds, --requests-per-round and --images must be positive, "
                     "--phases at least 2")
    extra_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env takes NAME=VALUE, got {item!r}")
        extra_env[name] = value
    uris = [make_png_uri(seed) for seed in range(args.images)]
    print(f"soak {args.mode}: {args.clients} clients, {len(uris)} distinct "
          f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} PNGs (~{len(uris[0]) * 3 // 4 // 1024} KB each), "
          f"max_tokens {args.max_tokens}, server args {args.server_arg or '-'}, "
          f"env {extra_env or '-'}", flush=True)
    try:
        with ServerProcess(args.model, args.warmup, args.server_arg, extra_env,
                           args.start_timeout) as server:
            print(f"server pid {server.proc.pid} on {server.base}", flush=True)
            if args.mode == "rounds":
                mode_rounds(server, args, uris)
            else:
                mode_load(server, args, uris)
            if not server.healthy():
                print("error: the server no longer answers /health:\n" + server.log_tail(),
                      file=sys.stderr)
                return 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
