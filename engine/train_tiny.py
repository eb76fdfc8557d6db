"""Train the built-in tiny Qwen2.5-VL on synthetic shapes (engine/shapes.py).

    python -m engine.train_tiny            # train from seed 0 (2 CPU cores: stage 1 about 27
                                           # minutes, stage 2 about 14) and write
                                           # engine/tiny_weights.safetensors (float16, 4.4 MB)
    python -m engine.train_tiny --eval     # held-out accuracy of the committed weights

The model, tokenizer, processor and chat template are engine/tiny.py's (the same classes as
Qwen2.5-VL-7B-Instruct). Training pictures come from seeds 0.. of `TRAIN_SEED`'s stream;
the held-out evaluation draws from `EVAL_SEED`, never used in training, and goes through the
app's own path: a LocalEngine on the built model, greedy, the app's pixel bounds.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

from . import shapes as S

TRAIN_SEED = 0
EVAL_SEED = 987654321
# Two stages: the model first learns the answers' language and only late in stage 1 starts
# to look at the question and the picture; stage 2 restarts the learning rate from there.
STEPS = 1100
STAGE2_STEPS = 600
STAGE2_LR = 1.5e-3
WEIGHTS = Path(__file__).with_name("tiny_weights.safetensors")


def _prompt_messages(ex: S.Example, min_pixels: int, max_pixels: int) -> list[dict]:
    parts = [{"type": "image", "image": im, "min_pixels": min_pixels, "max_pixels": max_pixels}
             for im in ex.images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": ex.question}]}]


def encode(processor, ex: S.Example, min_pixels: int = S.MIN_PIXELS, max_pixels: int = S.MAX_PIXELS):
    """Token ids, labels (answer + <|im_end|>), pixel values and grids for one example."""
    import torch
    from qwen_vl_utils import process_vision_info

    messages = _prompt_messages(ex, min_pixels, max_pixels)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    inp = processor(text=[text], images=images, return_tensors="pt")
    tok = processor.tokenizer
    answer = tok(ex.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.cat([inp["input_ids"][0], torch.tensor(answer)])
    labels = torch.full_like(ids, -100)
    labels[-len(answer):] = torch.tensor(answer)
    return ids, labels, inp["pixel_values"], inp["image_grid_thw"]


def collate(items, pad_id: int):
    import torch

    n = max(len(i[0]) for i in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, (i, l, _, _) in enumerate(items):
        ids[r, :len(i)] = i
        labels[r, :len(l)] = l
        mask[r, :len(i)] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=torch.cat([i[2] for i in items]),
                image_grid_thw=torch.cat([i[3] for i in items]))


def scene_args(step: int, total: int, rng: random.Random) -> dict:
    """Canvas sizes: the full 320..800 range, small ones more often (cheaper on a CPU)."""
    if rng.random() < 0.25:
        return {"min_side": 320, "max_side": 800}
    return {"min_side": 320, "max_side": 480}


def train(steps: int, batch: int, lr: float, out: Path, log_every: int = 10, seed: int = TRAIN_SEED,
          resume: Path | None = None) -> None:
    """`steps` AdamW steps of `batch` fresh examples from `random.Random(seed)`, linear warm-up
    then cosine decay to 5 % of `lr`; from `resume`'s weights (a previous stage) if given."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from . import tiny

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer)
    config = tiny.build_config(tokenizer)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    n_tok = len(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_tok:] = 0
        model.get_output_embeddings().weight[n_tok:] = 0
        # A gentler start than the random demo's 0.12.
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(0.02 / tiny.INIT_STD)
    if resume is not None:
        tiny.load_trained(model, resume)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    start = time.monotonic()
    step, ema = 0, None
    warm = 20
    ckpt_every = 120.0
    last_ckpt = start
    while True:
        elapsed = time.monotonic() - start
        if step >= steps:
            break
        frac = step / steps
        cur = lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur
        items = [encode(processor, S.make_example(rng, **scene_args(step, 0, rng))) for _ in range(batch)]
        b = collate(items, pad)
        labels = b.pop("labels")
        logits = model(**b).logits[:, :-1].float()
        target = labels[:, 1:]
        tok_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
            reduction="none").view(target.shape)
        # Each example weighs the same, whatever its answer's length (boxes are long).
        n_ans = (target != -100).sum(1).clamp(min=1)
        loss = (tok_loss.sum(1) / n_ans).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0:
            print(f"step {step} t={elapsed:.0f}s lr={cur:.2e} loss={loss.item():.3f} ema={ema:.3f}", flush=True)
        if time.monotonic() - last_ckpt > ckpt_every:
            _save(model, out, save_file)
            last_ckpt = time.monotonic()
    _save(model, out, save_file)
    print(f"trained {step} steps x {batch} examples in {time.monotonic() - start:.0f}s; "
          f"final ema loss {ema:.3f}; wrote {out}", flush=True)


def _save(model, out: Path, save_file) -> None:
    import torch

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)


# ---- held-out evaluation through the app's path ------------------------------------------

def evaluate(n: int, seed: int = EVAL_SEED, model_dir: Path | None = None, verbose: bool = False) -> dict:
    from PIL import Image  # noqa: F401

    from .config import EngineConfig
    from .local import LocalEngine
    from .types import Conversation, GenerationRequest, ImageInput, Message, SamplingParams

    from . import tiny

    if model_dir is None:
        import tempfile

        model_dir = tiny.build_tiny(Path(tempfile.mkdtemp(prefix="tiny-eval-")))
    engine = LocalEngine.from_config(EngineConfig(model=str(model_dir), device="cpu", warmup=False))
    rng = random.Random(seed)

    def ask(images, question, max_tokens=200):
        req = GenerationRequest(Conversation([Message("user", question, images=[ImageInput(i) for i in images])]),
                                SamplingParams(max_tokens=max_tokens, temperature=0))
        text, fin = engine.generate(req, timeout=600)
        return text

    res = {"count": 0, "colours": 0, "scenes": 0, "shapes": 0, "iou50": 0, "shape_of": 0, "colour_of": 0,
           "qa": 0, "two": 0, "two_n": 0}
    t0 = time.monotonic()
    try:
        for k in range(n):
            img, shapes = S.draw_scene(rng)
            res["scenes"] += 1
            a = ask([img], "How many shapes are there, and what colours are they?")
            ok_n = S.parse_count(a) == len(shapes)
            ok_c = S.parse_colours(a) == {s.colour for s in shapes}
            res["count"] += ok_n
            res["colours"] += ok_c
            d = ask([img], "Detect the shapes.", 400)
            truth = S.resized_boxes(shapes, img.size)
            ious = S.matched_ious([b for b, _ in S.parse_detections(d)], truth)
            res["shapes"] += len(shapes)
            res["iou50"] += sum(v >= 0.5 for v in ious)
            target = rng.choice(shapes)
            q1 = ask([img], f"What shape is the {target.colour} one?")
            res["shape_of"] += q1.strip() == S.shape_of_colour_answer(shapes, target.colour)
            q2 = ask([img], f"Which colour is the {target.kind}?")
            res["colour_of"] += q2.strip() == S.colour_of_shape_answer(shapes, target.kind)
            res["qa"] += 1
            if k % 2 == 0:
                a1, s1 = S.draw_scene(rng, n=1)
                a2, s2 = S.draw_scene(rng, n=1)
                which = rng.choice(["first", "second"])
                want = (s1 if which == "first" else s2)[0].colour
                t = ask([a1, a2], f"What colour is the shape in the {which} picture?")
                res["two"] += S.parse_colours(t) == {want}
                res["two_n"] += 1
            if verbose:
                print(f"[{k}] {img.size} truth={[s.label for s in shapes]}\n  count: {a}\n  detect: {d}\n"
                      f"  ious={['%.2f' % v for v in ious]}\n  {q1} | {q2}", flush=True)
    finally:
        engine.close()
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def report(res: dict) -> str:
    pct = lambda a, b: f"{100 * a / max(b, 1):.1f} %"  # noqa: E731
    return (f"held-out seed {EVAL_SEED}, {res['scenes']} pictures (320..800 px, app pixel bounds, greedy):\n"
            f"  count right:              {pct(res['count'], res['scenes'])}\n"
            f"  exact colour set:         {pct(res['colours'], res['scenes'])}\n"
            f"  boxes with IoU >= 0.5:    {pct(res['iou50'], res['shapes'])} of {res['shapes']} shapes\n"
            f"  'what shape is the X one' {pct(res['shape_of'], res['qa'])} exact\n"
            f"  'which colour is the X'   {pct(res['colour_of'], res['qa'])} exact\n"
            f"  second-picture colour:    {pct(res['two'], res['two_n'])} of {res['two_n']}\n"
            f"  ({res['seconds']} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("--eval", action="store_true", help="held-out accuracy of the committed weights")
    p.add_argument("--n", type=int, default=100, help="held-out pictures for --eval")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--stage", type=int, choices=[1, 2], help="run one stage only (2 resumes from --out)")
    args = p.parse_args(argv)
    if args.eval:
        print(report(evaluate(args.n, verbose=args.verbose)))
        return
    t0 = time.monotonic()
    if args.stage in (None, 1):
        train(args.steps, args.batch, args.lr, args.out)
    if args.stage in (None, 2):
        train(STAGE2_STEPS, args.batch, STAGE2_LR, args.out, seed=TRAIN_SEED + 1, resume=args.out)
    print(f"total training time {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
