"""tinylab/train.py's training targets: which tokens a box coordinate is written with,
which picture tokens lie on a shape's edges, and the data worker's batches."""

from __future__ import annotations

import random

import pytest

from tinylab import shapes as S
from tinylab import train as T


@pytest.fixture(scope="module")
def processor():
    from engine import tiny

    return tiny.build_processor(tiny.build_tokenizer(), trained=True)


def test_answer_edges_mark_each_coordinates_digits(processor):
    answer = S.detect_answer([S.Shape("circle", "red", (10, 20, 130, 140)),
                              S.Shape("star", "blue", (200, 30, 260, 90))], (280, 280))
    enc = processor.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    edges = T.answer_edges(answer, enc["offset_mapping"])
    written = {}
    for (a, b), k in zip(enc["offset_mapping"], edges):
        written.setdefault(k, []).append(answer[a:b])
    boxes = [b for b, _ in S.parse_detections(answer)]
    for k in range(4):
        # both entries' coordinate k, digit by digit, in answer order (red before blue)
        assert "".join(written[k + 1]) == "".join(str(int(b[k])) for b in boxes)
    assert all(c not in "0123456789" for c in "".join(written[0]).replace("bbox_2d", ""))
    count = S.count_answer([S.Shape("circle", "red", (0, 0, 9, 9))])
    assert set(T.answer_edges(count, processor.tokenizer(count, return_offsets_mapping=True)["offset_mapping"])) == {0}


def test_picture_tokens_on_a_shapes_edges_know_where_that_edge_is(processor):
    img, shapes = S.scene((280, 280), [("square", "green", (60, 90, 150, 200))])
    ex = S.Example([img], [("Detect the shapes.", S.detect_answer(shapes, img.size))], "detect",
                   [shapes], ["detect"])
    _ids, _w, _pix, grid, (cls, _rel, _abs, owner), _summary, _focus, edges, _query = T.encode(processor, ex)
    extreme = T.edge_bits(cls)
    gw = int(grid[0, 2]) // 2
    box = S.resized_boxes(shapes, img.size)[0]
    mine = (owner == 0).nonzero()[:, 0].tolist()
    rows, cols = {t // gw for t in mine}, {t % gw for t in mine}
    col = [g for g, _ in T.GROUPS].index
    for k, (line, of) in enumerate([(min(cols), "c"), (min(rows), "r"), (max(cols), "c"), (max(rows), "r")]):
        on = [t for t in mine if (t % gw if of == "c" else t // gw) == line]
        assert on and all(extreme[t] >> k & 1 for t in on)
        assert all(not extreme[t] >> k & 1 for t in set(mine) - set(on))
        assert {int(cls[t, col(f"edge{k}")]) for t in on} == {box[k] // T.EDGE_CELL}
        assert all(int(cls[t, col(f"edge{k}")]) == -100 for t in set(mine) - set(on))
    assert set(edges.tolist()) == {0, 1, 2, 3, 4}


def test_the_data_worker_draws_the_batches_drawn_in_line(processor):
    inline = T.batches(processor, random.Random(3), 2)
    worker = T.prefetched(3, 2)
    try:
        for _ in range(2):
            b, *_rest = T.collate(next(inline), processor.tokenizer.pad_token_id)
            w, *_rest = next(worker)
            assert b["input_ids"].equal(w["input_ids"])
            assert b["pixel_values"].equal(w["pixel_values"])
    finally:
        worker.close()


def test_the_held_out_report_counts_each_colour_drawn():
    res = T.evaluate(1)
    _img, shapes = S.draw_scene(random.Random(T.EVAL_SEED))
    drawn = {s.colour for s in shapes}
    assert {c for c, v in res["present"].items() if v} == drawn
    assert all(res["named"][c] <= res["present"][c] for c in S.COLOUR_NAMES)
    assert "orange" in T.report(res)
    assert 0 <= res["json"] <= res["scenes"] == 1 and "JSON" in T.report(res)


def test_the_query_targets_name_the_shape_and_the_digit_being_written(processor):
    """`answer_query`: each token of a box names, for the token before it to learn, the shape
    its entry is about (colour, kind), the coordinate (1..4) and the digit's place in it, and
    (for `--answer-box`) that shape's box and the coordinate's value in pixels."""
    red, blue = S.Shape("circle", "red", (10, 20, 130, 140)), S.Shape("star", "blue", (200, 30, 260, 90))
    img, _ = S.scene((280, 280), [])
    answer = S.detect_answer([red, blue], img.size)
    ex = S.Example([img], [("Detect the shapes.", answer)], "detect", [[red, blue]], ["detect"])
    ids, *_rest, edges, query = T.encode(processor, ex)
    tok = processor.tokenizer
    box = {(int(q[0]), int(q[1]), int(q[2])): [] for q in query if q[2] > 0}
    for t in (edges > 0).nonzero()[:, 0].tolist():
        c, k, e, d = query[t, :T.BOX_COLS].tolist()
        assert e == edges[t] and d >= 1
        box[(c, k, e)].append((tok.decode([int(ids[t])]), query[t, T.BOX_COLS:].tolist()))
    for s in (red, blue):
        key = (S.COLOUR_NAMES.index(s.colour), S.SHAPES.index(s.kind))
        truth = S.resized_boxes([s], img.size)[0]
        got = ["".join(text for text, _ in box[key + (e,)]) for e in (1, 2, 3, 4)]
        assert got == [str(v) for v in truth]
        assert all(cols == truth + [truth[e - 1]] for e in (1, 2, 3, 4) for _, cols in box[key + (e,)])
    assert set(query[edges == 0][:, 2].tolist()) == {0, -100}     # answer / prompt tokens


def test_a_missing_eval_weights_file_is_one_line(capsys, tmp_path):
    """--eval-weights that names no file is refused before anything is built or measured."""
    with pytest.raises(SystemExit) as stop:
        T.main(["--eval", "--eval-weights", str(tmp_path / "none.safetensors")])
    assert stop.value.code == 2
    assert "--eval-weights: no such file" in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_answer_box_probe_is_an_opt_in_that_reads_pixels():
    """`--answer-box` (README runs F and G) adds a probe and its loss; off, the recipe has
    neither, so the committed command trains what it trained before."""
    import torch

    plain, box, phase = T.Probes(128, 128), T.Probes(128, 128, "box"), T.Probes(128, 128, "phase")
    assert len(box.parameters()) == len(phase.parameters()) == len(plain.parameters()) + 2
    feats = torch.randn(3, 128)
    targets = torch.tensor([[10, 20, 60, 80, 20], [10, 20, 60, 80, -100], [-100] * 5])
    assert plain.box_loss(feats, targets, {}) == 0.0
    for probes in (box, phase):
        acc = {}
        assert probes.box_loss(feats, targets, acc) > 0 and 0 <= acc["coord_px"] <= T.ABS_SCALE
    with pytest.raises(SystemExit):
        T.main(["--answer-box", "cell", "--steps", "0"])
