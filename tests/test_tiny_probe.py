"""tinylab/probe.py: linear read-outs on the frozen tiny model find what its features hold."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / "engine" / "tiny_weights.safetensors").is_file(),
                                reason="no trained tiny weights")


def test_read_outs_find_the_colour_of_a_picture_token():
    """The vision tower's output tells a covered token's colour (the committed model: about
    95 % held out); a read-out whose labels were misaligned with the tokens would sit near
    chance (1 in 6)."""
    from tinylab import probe as tiny_probe

    res = tiny_probe.probe(train_batches=4, eval_batches=2)
    stages = ["vision", "L0", "L1", "L2", "L3", "L4"]
    assert set(res) == {f"{w}@{s}" for w in ("colour", "kind") for s in stages} | \
        {f"colours@L{k}" for k in range(5)}
    assert res["colour@vision"] > 0.7, res
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert tiny_probe.report(res).splitlines()[2].startswith("vision")


def test_the_box_read_outs_line_up_with_the_coordinates():
    """`--boxes`: with the true detection answer fed in, the committed model's next token at
    a coordinate's first digit is right over half the time and it closes a number after its
    last digit nine times in ten (README); a position off by one token would score near 0.
    The picture tokens of a shape tell its box to a few pixels after two layers (README: 4.5
    px), far better than what enters the language model (33 px); boxes paired with the wrong
    tokens would read out near the boxes' spread (65 px) at every layer."""
    from tinylab import probe as tiny_probe

    res = tiny_probe.boxes(fit_n=12, test_n=6)
    assert {"digit1", "digit2", "digit3", "length", "cell@L0", "cell±1@L4", "px@L3", "px<14@L3",
            "boxpx@L2", "boxpx<14@L2"} <= set(res)
    assert all(0.0 <= v <= 1.0 for k, v in res.items() if "px@" not in k)
    assert res["digit1"] > 0.3 and res["length"] > 0.5, res
    assert res["boxpx@L2"] < 15 and res["boxpx@L2"] < res["boxpx@L0"] / 2, res
    report = tiny_probe.box_report(res)
    assert "first digit" in report and report.splitlines()[2].split()[0] == "L0"


def test_a_missing_weights_file_is_one_line(capsys, tmp_path):
    from tinylab import probe as tiny_probe

    with pytest.raises(SystemExit) as stop:
        tiny_probe.main(["--boxes", "--weights", str(tmp_path / "none.safetensors")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--weights: no such file: "
                                                                      f"{tmp_path / 'none.safetensors'}")
