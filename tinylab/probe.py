"""Where the built-in tiny model loses the picture: linear read-outs on its frozen features.

    python -m tinylab.probe                 # the committed weights
    python -m tinylab.probe --weights W     # weights from `python -m tinylab.train --out W`
    python -m tinylab.probe --boxes         # where the boxes go wrong (teacher-forced)

The model stays frozen; linear read-outs are fitted to its features on fresh training
conversations (tinylab/train.py's data) and scored on conversations of the held-out seed.
They say how well each stage's features tell
- a picture token's colour and the kind of the shape covering it (the vision tower's output,
  then the input of each language-model layer), and
- the exact set of colours in the picture, from every answer token (each layer);
and, with `--boxes`, where the detection answers' coordinates go wrong: with the true answer
fed in (teacher forcing), how often the model's next token is right at each digit place of a
coordinate and ends the number at the right length, how well each layer's input, at the
token before a coordinate's first digit, tells the 14-pixel cell of the box edge being written,
and, in pixels, how well it tells that coordinate there and how well the picture tokens of a
shape tell that shape's box (the place the answer should copy it from).
A stage whose read-out is poor is where a training change should aim: a model whose answers
are wrong although its vision output tells colours apart has lost them on the way to the
answer, not in the picture.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from . import train as T

_COLOUR = [g for g, _ in T.GROUPS].index("cell")
_KIND = [g for g, _ in T.GROUPS].index("cellkind")


def _model(weights: Path | None):
    from engine import tiny

    model, tokenizer, config = tiny.build_untrained()
    processor = tiny.build_processor(tokenizer, trained=True)
    tiny.load_trained(model, weights)
    return model.eval(), processor, config


def features(weights: Path | None, seed: int, batches: int, batch: int = 8) -> dict:
    """The frozen model's features on `batches` batches of conversations from `seed`:
    "tokens": [stage][picture tokens a shape covers, hidden] with "colour"/"kind" labels,
    "answers": [layer][answer tokens of one-picture conversations, hidden] with "present",
    the 6 colours in the picture."""
    import torch

    model, processor, config = _model(weights)
    seen = {}
    hook = model.model.visual.register_forward_hook(lambda _m, _i, o: seen.__setitem__("v", o.pooler_output))
    pad, image = processor.tokenizer.pad_token_id, config.image_token_id
    source = T.batches(processor, random.Random(seed), batch)
    parts: dict[str, list] = {"tokens": [], "answers": [], "colour": [], "kind": [], "present": []}
    try:
        for _ in range(batches):
            b, weights_, aux, summary, _focus, _edges, _query = T.collate(next(source), pad)
            with torch.no_grad():
                out = model(**b, output_hidden_states=True)
            cls = aux[0]
            covered = cls[:, _KIND] > 0
            stages = [seen.pop("v")] + [h[b["input_ids"] == image] for h in out.hidden_states]
            parts["tokens"].append([f[covered] for f in stages])
            parts["colour"].append(cls[covered, _COLOUR] - 1)
            parts["kind"].append(cls[covered, _KIND] - 1)
            answering = weights_ > 0
            present = summary[answering.nonzero()[:, 0]][:, 1:7]
            one = present[:, 0] >= 0
            parts["answers"].append([h[answering][one] for h in out.hidden_states])
            parts["present"].append(present[one])
    finally:
        hook.remove()
    return {"tokens": [torch.cat(x) for x in zip(*parts["tokens"])],
            "answers": [torch.cat(x) for x in zip(*parts["answers"])],
            **{k: torch.cat(parts[k]) for k in ("colour", "kind", "present")}}


def _fit(x, y, binary: bool, steps: int = 300):
    """A linear read-out fitted to (x, y) by full-batch Adam on standardised features."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(x.shape[1], y.shape[1] if binary else int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        logits = head((x - mean) / std)
        loss = F.binary_cross_entropy_with_logits(logits, y) if binary else F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: head((z - mean) / std)


def probe(weights: Path | None = None, train_batches: int = 40, eval_batches: int = 12) -> dict:
    """{read-out: held-out accuracy}: "colour@S" and "kind@S" for picture tokens a shape
    covers (S: vision, then L0..Ln, the input of layer n), "colours@Ln" for the exact colour
    set from answer tokens of one-picture conversations. Read-outs are fitted on
    conversations of TRAIN_SEED + 1 and scored on the held-out EVAL_SEED."""
    import torch

    fit = features(weights, T.TRAIN_SEED + 1, train_batches)
    test = features(weights, T.EVAL_SEED, eval_batches)
    names = ["vision"] + [f"L{k}" for k in range(len(fit["tokens"]) - 1)]
    res = {}
    for name, xf, xt in zip(names, fit["tokens"], test["tokens"]):
        for what in ("colour", "kind"):
            head = _fit(xf, fit[what], binary=False)
            res[f"{what}@{name}"] = (head(xt).argmax(-1) == test[what]).float().mean().item()
    for k, (xf, xt) in enumerate(zip(fit["answers"], test["answers"])):
        head = _fit(xf, fit["present"], binary=True)
        res[f"colours@L{k}"] = ((head(xt) > 0) == (test["present"] > 0.5)).all(-1).float().mean().item()
    return res


def detections(weights: Path | None, seed: int, n: int) -> dict:
    """Teacher-forced detection answers of `n` pictures from `seed`: at each token before a
    coordinate's digit (and before the token after its last digit), whether the model's next
    token is right, the digit place (1: first), whether it closes the number; and at the
    token before a coordinate's first digit, each layer's input with the cell (EDGE_CELL
    pixels) of the box edge the coordinate names."""
    import torch

    from . import shapes as S

    model, processor, config = _model(weights)
    rng = random.Random(seed)
    right, place, closes, cells, coords, feats, shown, box = [], [], [], [], [], [], [], []
    for _ in range(n):
        ex = S.make_example(rng, task="detect")
        ids, _w, pixels, grid, aux, _s, focus, edges, query = T.encode(processor, ex)
        boxes = S.resized_boxes(ex.shapes[0], ex.images[0].size)
        with torch.no_grad():
            out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], pixel_values=pixels,
                        image_grid_thw=grid, output_hidden_states=True)
        guess = out.logits[0].argmax(-1)
        owned = aux[3] >= 0                            # of the picture tokens, those a shape covers
        at = (ids == config.image_token_id).nonzero()[:, 0][owned]
        shown.append([h[0, at] for h in out.hidden_states])
        box.append(aux[2][owned] * T.ABS_SCALE)
        digit = query[:, 3].clamp(min=0).tolist()     # a coordinate digit's place (answer_digits), else 0
        for p in range(1, len(ids)):
            end = not digit[p] and digit[p - 1] > 0
            if not digit[p] and not end:
                continue
            right.append(bool(guess[p - 1] == ids[p]))
            closes.append(end)
            place.append(digit[p])
            e, f = int(edges[p]), int(focus[p])
            if digit[p] == 1 and f and f & (f - 1) == 0:     # before any digit of it is written
                coords.append(boxes[f.bit_length() - 1][e - 1])
                cells.append(min(coords[-1] // T.EDGE_CELL, T.EDGE_CELLS - 1))
                feats.append([h[0, p - 1] for h in out.hidden_states])
    return {"right": torch.tensor(right), "place": torch.tensor(place), "closes": torch.tensor(closes),
            "cell": torch.tensor(cells), "coord": torch.tensor(coords, dtype=torch.float32)[:, None],
            "feats": [torch.stack(x) for x in zip(*feats)],
            "shown": [torch.cat(x) for x in zip(*shown)], "box": torch.cat(box)}


def _ridge(x, y, lam: float = 1.0):
    """A linear regression (ridge, on standardised features) fitted to (x, y)."""
    import torch

    mean, std = x.mean(0), x.std(0) + 1e-6
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1).double()
    w = torch.linalg.solve(z.T @ z + lam * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y.double())
    return lambda q: (torch.cat([(q - mean) / std, torch.ones(len(q), 1)], 1).double() @ w).float()


def _pixels(fit_x, fit_y, test_x, test_y, what: str, stage: str, res: dict) -> None:
    """res["WHAT@STAGE"] = mean absolute error in pixels of a ridge read-out; res["WHAT<14@STAGE"]
    = the share within one cell (EDGE_CELL pixels)."""
    miss = (_ridge(fit_x, fit_y)(test_x) - test_y).abs()
    res[f"{what}@{stage}"] = miss.mean().item()
    res[f"{what}<14@{stage}"] = (miss <= T.EDGE_CELL).float().mean().item()


def boxes(weights: Path | None = None, fit_n: int = 120, test_n: int = 40) -> dict:
    """{measure: held-out share}: "digit1".."digit3" (the model's next token right at that
    digit place of a coordinate, the true answer fed in), "length" (after a coordinate's last
    digit, it closes the number), "cell@Ln" and "cell±1@Ln" (a linear read-out of the box
    edge's cell from layer n's input at the token before the coordinate's first digit, where
    nothing written tells it yet, exact and within one cell; fitted on TRAIN_SEED + 1, scored
    on EVAL_SEED); "px@Ln" (pixels, not a share: the same read-out's mean error in pixels for
    the coordinate itself, a ridge regression; "px<14@Ln" the share within one cell) and
    "boxpx@Ln", "boxpx<14@Ln" (the same for the box of the shape a picture token shows, from
    its layer-n features: what an answer's lookup can copy)."""
    fit, test = detections(weights, T.TRAIN_SEED + 1, fit_n), detections(weights, T.EVAL_SEED, test_n)
    res = {}
    for k in (1, 2, 3):
        at = test["place"] == k
        res[f"digit{k}"] = test["right"][at].float().mean().item() if at.any() else 0.0
    res["length"] = test["right"][test["closes"]].float().mean().item()
    for k, (xf, xt) in enumerate(zip(fit["feats"], test["feats"])):
        head = _fit(xf, fit["cell"], binary=False)
        miss = (head(xt).argmax(-1) - test["cell"]).abs()
        res[f"cell@L{k}"] = (miss == 0).float().mean().item()
        res[f"cell±1@L{k}"] = (miss <= 1).float().mean().item()
        _pixels(xf, fit["coord"], xt, test["coord"], "px", f"L{k}", res)
    for k, (xf, xt) in enumerate(zip(fit["shown"], test["shown"])):
        _pixels(xf, fit["box"], xt, test["box"], "boxpx", f"L{k}", res)
    return res


def box_report(res: dict) -> str:
    layers = [k.split("@")[1] for k in res if k.startswith("cell@")]
    rows = [f"next token right, true answer fed in: first digit {100 * res['digit1']:.1f} %, second "
            f"{100 * res['digit2']:.1f} %, third {100 * res['digit3']:.1f} %; the number closed after its "
            f"last digit {100 * res['length']:.1f} %",
            f"read from layer n's input: at the token before a coordinate's first digit, the box edge's "
            f"{T.EDGE_CELL}-pixel cell (exact, within one) and the coordinate (mean error, share within "
            f"{T.EDGE_CELL} px); at the picture tokens of a shape, its box (the same):"]
    rows += [f"  {s:4}{100 * res[f'cell@{s}']:7.1f} %{100 * res[f'cell±1@{s}']:7.1f} %"
             f"{res[f'px@{s}']:8.1f} px{100 * res[f'px<14@{s}']:7.1f} %"
             f"{res[f'boxpx@{s}']:8.1f} px{100 * res[f'boxpx<14@{s}']:7.1f} %" for s in layers]
    return "\n".join(rows)


def report(res: dict) -> str:
    stages = [k.split("@")[1] for k in res if k.startswith("colour@")]
    rows = [f"{'':8}{'colour':>8}{'kind':>8}{'colour set':>12}"]
    for s in stages:
        cs = res.get(f"colours@{s}")
        rows.append(f"{s:8}{100 * res[f'colour@{s}']:7.1f}%{100 * res[f'kind@{s}']:7.1f}%"
                    + (f"{100 * cs:11.1f}%" if cs is not None else f"{'-':>12}"))
    return ("linear read-outs on frozen features (picture tokens a shape covers; colour set from answer "
            "tokens, exact)\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tinylab.probe", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="default: the committed weights")
    p.add_argument("--train-batches", type=int, default=40, help="batches of 8 conversations to fit on")
    p.add_argument("--eval-batches", type=int, default=12, help="held-out batches to score on")
    p.add_argument("--boxes", action="store_true", help="where the detection answers' boxes go wrong")
    args = p.parse_args(argv)
    if args.weights is not None and not args.weights.is_file():
        p.error(f"--weights: no such file: {args.weights}")
    import torch

    torch.set_num_threads(2)
    if args.boxes:
        print(box_report(boxes(args.weights)))
        return
    print(report(probe(args.weights, args.train_batches, args.eval_batches)))


if __name__ == "__main__":
    main()
