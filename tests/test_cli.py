"""`python -m engine`: the tutorial's offline script as a command."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_streams_text_and_speed_line(tiny_model_dir):
    res = run_cli("--model", str(tiny_model_dir), "--image", "assets/street_sign.jpg",
                  "--prompt", "Describe this image.", "--max-tokens", "24", "--ignore-eos")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("Processed prompts: 1/1 [")
    assert "output 24 tokens" in lines[-1] and "est. speed input:" in lines[-1]
    assert "first token" in lines[-1] and "1 image(s)" in lines[-1]
    assert "".join(lines[:-1]).strip()          # some answer text came first
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("make_args,message", [
    (lambda tmp: ["--image", str(tmp / "missing.png")], "File not found"),
    (lambda tmp: ["--image", "assets/chart.png"] * 11, "At most 10 image(s)"),
    (lambda tmp: ["--image", str(tmp / "corrupt.png")], "is not a readable image"),
    (lambda tmp: ["--image", "assets/chart.png", "--temperature", "-1"], "temperature must be"),
    (lambda tmp: ["--image", "assets/chart.png", "--max-image-pixels", "1000"],
     "at most 1,000 pixels"),
])
def test_cli_bad_input_one_line_exit_2(tiny_model_dir, tmp_path, make_args, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    res = run_cli("--model", str(tiny_model_dir), *make_args(tmp_path))
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    res = run_cli("--model", str(tmp_path / "nope"), "--device", "cpu", "--image", "assets/chart.png")
    assert res.returncode == 1
    assert "Cannot load model" in res.stderr and "Traceback" not in res.stderr
