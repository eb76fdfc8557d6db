"""Where the built-in tiny model loses the picture: linear read-outs on its frozen features.

    python -m engine.tiny_probe                 # the committed weights
    python -m engine.tiny_probe --weights W     # weights from `python -m engine.train_tiny --out W`

The model stays frozen; linear read-outs are fitted to its features on fresh training
conversations (engine/train_tiny.py's data) and scored on conversations of the held-out seed.
They say how well each stage's features tell
- a picture token's colour and the kind of the shape covering it (the vision tower's output,
  then the input of each language-model layer), and
- the exact set of colours in the picture, from every answer token (each layer).
A stage whose read-out is poor is where a training change should aim: a model whose answers
are wrong although its vision output tells colours apart has lost them on the way to the
answer, not in the picture.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from . import train_tiny as T

_COLOUR = [g for g, _ in T.GROUPS].index("cell")
_KIND = [g for g, _ in T.GROUPS].index("cellkind")


def _model(weights: Path | None):
    from . import tiny

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
    p = argparse.ArgumentParser(prog="python -m engine.tiny_probe", description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=None, help="default: the committed weights")
    p.add_argument("--train-batches", type=int, default=40, help="batches of 8 conversations to fit on")
    p.add_argument("--eval-batches", type=int, default=12, help="held-out batches to score on")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    print(report(probe(args.weights, args.train_batches, args.eval_batches)))


if __name__ == "__main__":
    main()
