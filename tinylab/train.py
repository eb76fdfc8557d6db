"""Train the built-in tiny Qwen2.5-VL on synthetic shapes (tinylab/shapes.py).

    python -m tinylab.train            # train from seed 0 (2500 steps of 8 conversations,
                                           # 30 minutes on 2 CPU cores) and write
                                           # engine/tiny_weights.safetensors (float16, 4.4 MB)
    python -m tinylab.train --eval     # held-out accuracy of the committed weights

The model, tokenizer, processor and chat template are engine/tiny.py's (the same classes as
Qwen2.5-VL-7B-Instruct). Training pictures come from seeds 0.. of `TRAIN_SEED`'s stream;
the held-out evaluation draws from `EVAL_SEED`, never used in training, and goes through the
app's own path: a LocalEngine on the built model, greedy, the app's pixel bounds (then the
model processor's own cap, shapes.MODEL_MAX_PIXELS).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
from pathlib import Path

from . import shapes as S

TRAIN_SEED = 0
EVAL_SEED = 987654321
STEPS = 2500
BATCH = 8
LR = 2e-3
AUX_WEIGHT = 1.0
WEIGHTS = Path(__file__).with_name("tiny_weights.safetensors")

# ---- auxiliary targets: what each picture token should know -------------------------------
# Training adds linear probes, thrown away afterwards, that tell the model early what its
# answers will need, so that it learns in minutes what the answers alone teach in hours:
# - on the vision tower's output (per 28x28 token): the colour and kind of the shape whose
#   pixels cover the token, whether a shape's centre is in it, and that shape's box relative
#   to the token. The tower only has relative positions (2-D rotary), so nothing absolute is
#   asked of it.
# - on the language model's picture tokens after LM_LAYER layers: the token's row and column
#   (the 3-D rotary positions make these knowable there), which picture it is in, the number
#   of shapes and, on every token a shape covers, that shape's colour and kind and whether
#   the token is on one of its edges (its leftmost column, top row, ...); on such a token, the
#   14-pixel cell of the resized picture that edge of the box falls in. An answer writing a
#   coordinate of a shape it has named attends to that shape's tokens on that edge
#   (`Looking`), which all agree, and writes the cell's digits: a cell is fine enough for an
#   IoU of 0.5 on 99 % of shapes, a 28-pixel token on 76 %.
# - on every answer token after LM_LAYER layers: the number of shapes and which colours, kinds
#   and (colour, kind) pairs the picture holds (answers name shapes in a fixed order of colour
#   and kind, so they walk through that set); one layer later, the picture word it is about
#   to write (after the third layer's lookups, `Looking`).
VISION_GROUPS = [("cell", 7), ("cellkind", 5), ("centre", 2)]
EDGE_CELL = 14          # a box edge is learned to the 14-pixel cell it falls in (a patch)
EDGE_CELLS = 33         # cells of the longest resized side (442 px for a 2.5:1 canvas)
LM_GROUPS = [("row", 24), ("col", 24), ("pic", 2), ("n", 4), ("colour", 7), ("kind", 5)] + \
            [(f"edge{k}", EDGE_CELLS) for k in range(4)] + [(f"on_edge{k}", 2) for k in range(4)]
GROUPS = VISION_GROUPS + LM_GROUPS
LM_LAYER = 2
REPORT = ("row", "col", "n", "edge0", "edge1", "edge2")
DETECT_WEIGHT = 2.0     # a detection answer weighs this much against another answer's 1
CONTENT_WEIGHT = 4.0    # within an answer, a word that depends on the picture (a colour, a
                        # kind, a digit) weighs this much against a word of the template
NEXT_WORDS = S.COLOUR_NAMES + S.SHAPES + list("0123456789")    # the picture words
CONTENT_WORDS = frozenset(NEXT_WORDS + list(S.PLURAL.values()))
# (layer, head, what) whose attention `Looking` supervises, from every answer token: in the
# first layer (which knows only its own token, not the question) "all" the shapes' tokens,
# and the "centres" of the shapes, one token each, so that what that head gathers weighs
# every shape alike; in the third, the shapes "about" to be looked up and, while a box is
# written, the named shape's tokens on the "edge" the coordinate is about.
ATTN_HEADS = [(0, 0, "all"), (0, 1, "centres"), (2, 0, "about"), (2, 1, "edge")]
ATTN_WEIGHT = 0.6
# what the next token looks up, asked of each answer token after LM_LAYER layers
# (`Probes.query_loss`): the colour and kind of the one shape, the coordinate, the digit
QUERY_GROUPS = [("colour", 6), ("kind", 4), ("coord", 5), ("digit", 4)]
# Opt-in (`--answer-box`, runs F and G of the README; not in the committed recipe): after one
# more layer (the lookups), an answer token about one shape should hold that shape's box and,
# before a coordinate's digits, that coordinate (pixels / ABS_SCALE), and with "phase" also the
# cosine and sine of its tens digit's phase (`Probes.box_loss`).
BOX_COLS = len(QUERY_GROUPS)    # `answer_query`'s columns from here: the box (4), the coordinate
QUERY_COLS = BOX_COLS + 5
ANSWER_BOX = ("box", "phase")
ABS_SCALE = 512.0       # the absolute box probe reads pixels / this (the same scale for every picture)


def coverage(pixels, mean, std, shapes: list[S.Shape], boxes: list[list[int]], gh: int, gw: int):
    """[gh*gw, len(shapes)]: the share of each token's pixels, as the model sees them (the
    processor's resized, normalised patches), that belong to each shape: inside its box and
    close to its colour. A shape's box is not its pixels (a star fills half of it)."""
    import torch

    # The processor's patch order: merged token (row-major), then its 2x2 patches, then
    # channel, frame, 14x14 pixels.
    x = pixels.view(gh, gw, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]
    rgb = (x * std.view(1, 1, 1, 1, 3, 1, 1) + mean.view(1, 1, 1, 1, 3, 1, 1)) * 255
    ys = (torch.arange(gh).view(gh, 1, 1, 1, 1, 1) * 28 + torch.arange(2).view(1, 1, 2, 1, 1, 1) * 14
          + torch.arange(14).view(1, 1, 1, 1, 14, 1))
    xs = (torch.arange(gw).view(1, gw, 1, 1, 1, 1) * 28 + torch.arange(2).view(1, 1, 1, 2, 1, 1) * 14
          + torch.arange(14).view(1, 1, 1, 1, 1, 14))
    out = torch.zeros(gh * gw, len(shapes))
    for i, (s, b) in enumerate(zip(shapes, boxes)):
        colour = torch.tensor(S.COLOURS[s.colour], dtype=torch.float32).view(1, 1, 1, 1, 3, 1, 1)
        near = ((rgb - colour) ** 2).sum(4) < 45 ** 2
        inside = (xs >= b[0] - 1) & (xs <= b[2] + 1) & (ys >= b[1] - 1) & (ys <= b[3] + 1)
        out[:, i] = (near & inside).float().mean(dim=(2, 3, 4, 5)).reshape(-1)
    return out


def token_targets(shapes: list[S.Shape], size: tuple[int, int], gh: int, gw: int, picture: int,
                  pixels, mean, std):
    """Per token of one picture whose model-side grid is gh x gw tokens: classes
    [gh*gw, len(GROUPS)] (-100: nothing to learn), the covering shape's box relative to the
    token (in tokens) and in the picture (pixels / ABS_SCALE), which shape covers the
    token (its index in `shapes`, -1 for none: at least a quarter of the token's `pixels`,
    the processor's patches, `coverage`). Whether a covered token lies on its shape's edge k
    (the leftmost column, top row, rightmost column, bottom row of the shape's tokens, for
    box coordinate k) is the class on_edgeK (`edge_bits`)."""
    import torch

    cls = torch.full((gh * gw, len(GROUPS)), -100, dtype=torch.long)
    rel = torch.zeros((gh * gw, 4))
    absolute = torch.zeros((gh * gw, 4))
    owner_of = torch.full((gh * gw,), -1, dtype=torch.long)
    boxes = S.resized_boxes(shapes, size)
    col = {g: j for j, (g, _) in enumerate(GROUPS)}
    for g in ("cell", "cellkind", "centre", "colour", "kind"):
        cls[:, col[g]] = 0
    cls[:, col["n"]] = len(shapes) - 1
    cls[:, col["pic"]] = min(picture, 1)
    cls[:, col["row"]] = torch.arange(gh).repeat_interleave(gw).clamp(max=23)
    cls[:, col["col"]] = torch.arange(gw).repeat(gh).clamp(max=23)
    cover = coverage(pixels, mean, std, shapes, boxes, gh, gw)
    share, owner = cover.max(-1) if len(shapes) else (torch.zeros(gh * gw), torch.zeros(gh * gw, dtype=torch.long))
    for s, b in zip(shapes, boxes):
        r, c = min(int((b[1] + b[3]) / 2 // 28), gh - 1), min(int((b[0] + b[2]) / 2 // 28), gw - 1)
        cls[r * gw + c, col["centre"]] = 1
    for i, (s, b) in enumerate(zip(shapes, boxes)):
        row = {"cell": 1 + S.COLOUR_NAMES.index(s.colour), "cellkind": 1 + S.SHAPES.index(s.kind),
               "colour": 1 + S.COLOUR_NAMES.index(s.colour), "kind": 1 + S.SHAPES.index(s.kind)}
        mine = ((owner == i) & (share >= 0.25)).nonzero()[:, 0].tolist()
        places = [divmod(t, gw) for t in mine]
        ends = [min(c for _, c in places), min(r for r, _ in places),
                max(c for _, c in places), max(r for r, _ in places)] if mine else []
        for t, (tr, tc) in zip(mine, places):
            for g, v in row.items():
                cls[t, col[g]] = v
            for k, at in enumerate((tc, tr, tc, tr)):
                cls[t, col[f"on_edge{k}"]] = int(at == ends[k])
                if at == ends[k]:
                    cls[t, col[f"edge{k}"]] = min(b[k] // EDGE_CELL, EDGE_CELLS - 1)
            x0, y0 = tc * 28, tr * 28
            rel[t] = torch.tensor([(b[0] - x0) / 28, (b[1] - y0) / 28, (b[2] - x0) / 28, (b[3] - y0) / 28])
            absolute[t] = torch.tensor(b, dtype=torch.float32) / ABS_SCALE
            owner_of[t] = i
    return cls, rel, absolute, owner_of


def edge_bits(cls):
    """[tokens]: bit k set where a picture token lies on edge k of its shape (the on_edgeK
    classes of `token_targets`), for `Looking`'s "edge" target."""
    on = [[g for g, _ in GROUPS].index(f"on_edge{k}") for k in range(4)]
    return sum((cls[:, j] == 1).long() << k for k, j in enumerate(on))


def _probe_loss(out, cls, groups, first: int, acc: dict):
    import torch.nn.functional as F

    loss, at = 0.0, 0
    for j, (g, n) in enumerate(groups):
        logits, tgt = out[:, at:at + n], cls[:, first + j]
        at += n
        keep = tgt != -100
        if keep.any():
            loss = loss + F.cross_entropy(logits[keep], tgt[keep])
            if g in REPORT:
                acc[g] = (logits[keep].argmax(-1) == tgt[keep]).float().mean().item()
    return loss / len(groups), at


def next_word_classes(tokenizer, vocab_size: int):
    """token id -> index in NEXT_WORDS (a kind's plural counts as the kind), else -1."""
    import torch

    table = torch.full((vocab_size,), -1, dtype=torch.long)
    plural = {v: k for k, v in S.PLURAL.items()}
    for i in range(len(tokenizer)):
        w = tokenizer.decode([i]).strip()
        w = plural.get(w, w)
        if w in NEXT_WORDS:
            table[i] = NEXT_WORDS.index(w)
    return table


class Looking:
    """Attention supervision: in layer L, head h (ATTN_HEADS), an answer token should look at
    the picture tokens of every shape ("all"), or of the shapes its next word looks up
    ("about", `answer_focus`). Without it, answer tokens that gather the picture's colours
    were at chance after half of the training budget (tinylab/probe.py measures it)."""

    def __init__(self, layers) -> None:
        self.layers, self.seen = layers, {}
        for layer in sorted({layer for layer, _head, _what in ATTN_HEADS}):
            layers[layer].self_attn.register_forward_pre_hook(self._catch(layer), with_kwargs=True)

    def _catch(self, layer: int):
        def hook(_module, _args, kwargs):
            self.seen[layer] = (kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    def probs(self, layer: int, head: int):
        """[B, T, T]: the attention of `head` in `layer`, recomputed from its inputs."""
        import torch
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

        attn = self.layers[layer].self_attn
        h, (cos, sin) = self.seen[layer]
        b, n, _ = h.shape
        q = attn.q_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)[:, head:head + 1]
        kv = head // attn.num_key_value_groups
        k = attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)[:, kv:kv + 1]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = (q @ k.transpose(-1, -2))[:, 0] * attn.scaling
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def loss(self, focus, edges, answering, owner, extreme, centre, acc: dict):
        """focus [B, T-1]: bitmask of the shapes position p looks up (its next token's
        `answer_focus`); edges [B, T-1]: 1 + the box coordinate its next token writes
        (`answer_edges`), 0: none; answering [B, T-1]: p writes an answer token; owner
        [B, T]: the shape a picture token shows, -1: none; extreme [B, T]: the edges of its
        shape the token lies on (`edge_bits`); centre [B, T]: a shape's centre is in it."""
        import torch

        shown = (owner >= 0)[:, None, :]
        about = ((focus[:, :, None] >> owner.clamp(min=0)[:, None, :]) & 1).bool() & shown
        on_edge = ((extreme[:, None, :] >> (edges[:, :, None] - 1).clamp(min=0)) & 1).bool()
        look = {"about": about, "edge": about & on_edge & (edges > 0)[:, :, None],
                "centres": centre[:, None, :] & answering[:, :, None], "all": shown & answering[:, :, None]}
        total = 0.0
        for layer, head, what in ATTN_HEADS:
            probs = self.probs(layer, head)[:, :-1]
            rows = look[what].any(-1)
            if rows.any():
                mass = (probs * look[what]).sum(-1)[rows]
                acc[f"look{layer}{head}"] = mass.mean().item()
                total = total - torch.log(mass + 1e-4).mean()
        self.seen.clear()
        return total / len(ATTN_HEADS)


SUMMARY = 4 + len(S.COLOUR_NAMES) + len(S.SHAPES) + len(S.COLOUR_NAMES) * len(S.SHAPES)


class Probes:
    """The linear probes and their losses (see above; `box_loss` only with `answer_box`)."""

    def __init__(self, vision_dim: int, lm_dim: int, answer_box: str = "") -> None:
        import torch

        self.vision = torch.nn.Linear(vision_dim, sum(n for _, n in VISION_GROUPS) + 4)
        self.lm = torch.nn.Linear(lm_dim, sum(n for _, n in LM_GROUPS) + 4)
        self.summary = torch.nn.Linear(lm_dim, SUMMARY)
        self.next_word = torch.nn.Linear(lm_dim, len(NEXT_WORDS))
        self.query = torch.nn.Linear(lm_dim, sum(n for _, n in QUERY_GROUPS))
        self.answer_box = answer_box
        self.box = torch.nn.Linear(lm_dim, 7 if answer_box == "phase" else 5) if answer_box else None

    def parameters(self):
        heads = [self.vision, self.lm, self.summary, self.next_word, self.query]
        heads += [self.box] if self.box is not None else []
        return [p for m in heads for p in m.parameters()]

    def box_loss(self, feats, targets, acc: dict):
        """After the lookups, an answer token about one shape holds its box, and one about to
        write a coordinate's digits that coordinate (`answer_query`'s columns from BOX_COLS):
        the picture tokens know their shape's box to a few pixels, the answers of the committed
        recipe to ~40 (`python -m tinylab.probe --boxes`). "phase" adds the cosine and sine
        of the tens digit's phase, from which a linear read-out names that digit."""
        import torch
        import torch.nn.functional as F

        keep = targets >= 0
        if self.box is None or not keep.any():
            return 0.0
        raw = self.box(feats)
        read = torch.sigmoid(raw[:, :5])
        loss = 40 * F.smooth_l1_loss(read[keep], targets[keep].float() / ABS_SCALE, beta=0.01)
        coord = keep[:, 4]
        if coord.any():
            err = (read[coord, 4] - targets[coord, 4].float() / ABS_SCALE).abs()
            acc["coord_px"] = (err.mean() * ABS_SCALE).item()
        if coord.any() and self.answer_box == "phase":
            phase = targets[coord, 4].float() * (2 * math.pi / 100)
            circle = torch.stack([phase.cos(), phase.sin()], -1)
            loss = loss + 10 * F.mse_loss(torch.tanh(raw[coord, 5:]), circle)
        return loss

    def next_word_loss(self, feats, classes, acc: dict):
        """Deep supervision: after LM_LAYER + 1 layers (the lookups of `Looking`'s third
        layer), an answer token should already know the picture word it is about to write (a
        colour, a kind, a digit), the answers' own target reached by a path a layer shorter."""
        import torch.nn.functional as F

        keep = classes >= 0
        if not keep.any():
            return 0.0
        out = self.next_word(feats[keep])
        acc["next_word"] = (out.argmax(-1) == classes[keep]).float().mean().item()
        return 3 * F.cross_entropy(out, classes[keep])

    def query_loss(self, feats, classes, acc: dict):
        """The query side of `Looking`'s lookups: after LM_LAYER layers, an answer token should
        know what its next token looks up (the colour and kind of the one shape it is about,
        the box coordinate and the digit of it), so that its third layer's heads can ask."""
        import torch.nn.functional as F

        out = self.query(feats)
        loss, at = 0.0, 0
        for j, (g, n) in enumerate(QUERY_GROUPS):
            logits, tgt = out[:, at:at + n], classes[:, j]
            at += n
            keep = tgt != -100
            if keep.any():
                loss = loss + F.cross_entropy(logits[keep], tgt[keep])
                acc[f"q_{g}"] = (logits[keep].argmax(-1) == tgt[keep]).float().mean().item()
        return 3 * loss / len(QUERY_GROUPS)

    def summary_loss(self, feats, summary, acc: dict):
        """Answer tokens (after LM_LAYER layers) should know the scene: this pulls the
        language model's attention onto the picture from the first steps."""
        import torch.nn.functional as F

        keep = summary[:, 0] >= 0
        if not keep.any():
            return 0.0
        out, tgt = self.summary(feats[keep]), summary[keep]
        n = tgt[:, 0].long()
        acc["sum_n"] = (out[:, :4].argmax(-1) == n).float().mean().item()
        acc["sum_colours"] = ((out[:, 4:10] > 0) == (tgt[:, 1:7] > 0.5)).all(-1).float().mean().item()
        acc["sum_pairs"] = ((out[:, 14:] > 0) == (tgt[:, 11:] > 0.5)).all(-1).float().mean().item()
        return 3 * F.cross_entropy(out[:, :4], n) + 3 * F.binary_cross_entropy_with_logits(out[:, 4:], tgt[:, 1:])

    def loss(self, vision_feats, lm_feats, cls, rel, absolute, owner):
        import torch
        import torch.nn.functional as F

        mask = owner >= 0
        acc: dict[str, float] = {}
        v_out, l_out = self.vision(vision_feats), self.lm(lm_feats)
        v_loss, at_v = _probe_loss(v_out, cls, VISION_GROUPS, 0, acc)
        l_loss, at_l = _probe_loss(l_out, cls, LM_GROUPS, len(VISION_GROUPS), acc)
        loss = 3 * (v_loss + l_loss)
        if mask.any():
            loss = loss + 4 * F.smooth_l1_loss(v_out[mask, at_v:at_v + 4], rel[mask], beta=0.05)
            loss = loss + 40 * F.smooth_l1_loss(torch.sigmoid(l_out[mask, at_l:at_l + 4]), absolute[mask],
                                                beta=0.01)
        return loss, acc


# ---- conversations as token ids ------------------------------------------------------------

def encode(processor, ex: S.Example, min_pixels: int = S.MIN_PIXELS, max_pixels: int = S.MAX_PIXELS):
    """Token ids, per-token loss weights (each answer + <|im_end|> weighs 1 in all), pixel
    values, grids and auxiliary targets of one conversation, rendered as the app renders it."""
    import torch
    from qwen_vl_utils import process_vision_info

    q0 = ex.turns[0][0]
    parts = [{"type": "image", "image": im, "min_pixels": min_pixels, "max_pixels": max_pixels}
             for im in ex.images]
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": q0}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, _ = process_vision_info(messages)
    inp = processor(text=[text], images=images, return_tensors="pt")
    tok = processor.tokenizer
    ids = [inp["input_ids"][0]]
    weights = [torch.zeros(len(ids[0]))]
    focus = [torch.zeros(len(ids[0]), dtype=torch.long)]
    edges = [torch.zeros(len(ids[0]), dtype=torch.long)]
    query = [torch.full((len(ids[0]), QUERY_COLS), -100, dtype=torch.long)]
    flat = [s for pic in ex.shapes for s in pic]
    flat_boxes = [b for pic, im in zip(ex.shapes, ex.images) for b in S.resized_boxes(pic, im.size)]
    for i, (q, a) in enumerate(ex.turns):
        if i:
            t = tok(f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                    add_special_tokens=False)["input_ids"]
            ids.append(torch.tensor(t))
            weights.append(torch.zeros(len(t)))
            focus.append(torch.zeros(len(t), dtype=torch.long))
            edges.append(torch.zeros(len(t), dtype=torch.long))
            query.append(torch.full((len(t), QUERY_COLS), -100, dtype=torch.long))
        enc = tok(a + "<|im_end|>", add_special_tokens=False, return_offsets_mapping=True)
        t = enc["input_ids"]
        focus.append(torch.tensor(answer_focus(ex, i, enc["offset_mapping"])))
        edges.append(torch.tensor(answer_edges(a, enc["offset_mapping"])))
        query.append(answer_query(flat, flat_boxes, focus[-1], edges[-1],
                                  answer_digits(a, enc["offset_mapping"])))
        ids.append(torch.tensor(t))
        w = torch.tensor([CONTENT_WEIGHT if tok.decode([i]).strip() in CONTENT_WORDS else 1.0 for i in t])
        weights.append(w * (DETECT_WEIGHT if a.startswith("```json") else 1.0) / w.sum())
    grid = inp["image_grid_thw"]
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    targets, at, first = [], 0, 0
    for k, (sh, im, g) in enumerate(zip(ex.shapes, ex.images, grid)):
        gh, gw = int(g[1]) // 2, int(g[2]) // 2
        pix = inp["pixel_values"][at:at + gh * gw * 4]
        at += gh * gw * 4
        cls, rel, absolute, owner = token_targets(sh, im.size, gh, gw, k, pix, mean, std)
        targets.append((cls, rel, absolute, torch.where(owner >= 0, owner + first, owner)))
        first += len(sh)
    return (torch.cat(ids), torch.cat(weights), inp["pixel_values"], grid,
            [torch.cat(x) for x in zip(*targets)], scene_summary(ex), torch.cat(focus), torch.cat(edges),
            torch.cat(query))


def answer_edges(answer: str, offsets) -> list[int]:
    """Per token of an answer, 1 + the box coordinate (x1, y1, x2, y2) its characters belong
    to in a detection's `bbox_2d`, else 0."""
    spans = [(box.start(1) + m.start(), box.start(1) + m.end(), k + 1)
             for box in re.finditer(r'"bbox_2d": \[([^\]]*)\]', answer)
             for k, m in enumerate(re.finditer(r"\d+", box.group(1)))]
    return [next((k for a, b, k in spans if a <= cs < b), 0) for cs, _ in offsets]


def answer_digits(answer: str, offsets) -> list[int]:
    """Per token of an answer, 1 + its place in the number it belongs to (0: not a digit)."""
    at = {m.start() + j: j + 1 for m in re.finditer(r"\d+", answer) for j in range(len(m.group()))}
    return [at.get(cs, 0) if ce - cs == 1 else 0 for cs, ce in offsets]


def answer_query(shapes: list[S.Shape], boxes: list[list[int]], focus, edges, digits: list[int]):
    """[tokens, QUERY_COLS]: `Probes.query_loss`'s and `Probes.box_loss`'s targets (-100:
    none) for an answer whose tokens look up `focus` (bitmasks over `shapes`, whose resized
    `boxes` these are) and write box coordinates `edges`."""
    import torch

    out = torch.full((len(digits), QUERY_COLS), -100, dtype=torch.long)
    for t, (f, e, d) in enumerate(zip(focus.tolist(), edges.tolist(), digits)):
        if f and f & (f - 1) == 0:
            i = f.bit_length() - 1
            out[t, 0], out[t, 1] = S.COLOUR_NAMES.index(shapes[i].colour), S.SHAPES.index(shapes[i].kind)
            out[t, BOX_COLS:BOX_COLS + 4] = torch.tensor(boxes[i])
            if e:
                out[t, BOX_COLS + 4] = boxes[i][e - 1]
        out[t, 2], out[t, 3] = e, min(d, 3) if e else 0
    return out


def answer_focus(ex: S.Example, turn: int, offsets) -> list[int]:
    """Per token of turn `turn`'s answer, the shapes (a bitmask over the conversation's
    shapes, numbered picture by picture; 0: none) that writing it means looking up: the
    shapes of the colour or kind asked about, the shape of the picture asked about, and,
    within a list or a detection, the shape just named (its kind, its box). Which shape a
    list names next is not a lookup (it depends on what is there), so it gets no target."""
    question, answer = ex.turns[turn]
    task = ex.tasks[turn]
    if task == "two":
        return [1 if "first" in question else 2] * len(offsets)
    shapes = ex.shapes[0]
    if task in ("shape_of", "colour_of"):
        names = S.COLOUR_NAMES if task == "shape_of" else S.SHAPES
        key = next(w for w in re.findall(r"[a-z]+", question.lower()) if w in names)
        mask = sum(1 << i for i, s in enumerate(shapes) if key in (s.colour, s.kind))
        return [mask] * len(offsets)
    spans, at = [], 0
    for i in S.answer_order(shapes):
        start = answer.find(shapes[i].label, at) + len(shapes[i].colour)
        end = answer.find("}", start) + 1 if task == "detect" else start + len(shapes[i].kind) + 1
        spans.append((start, end, 1 << i))
        at = end
    return [next((m for a, b, m in spans if a <= cs < b), 0) for cs, _ in offsets]


def scene_summary(ex: S.Example):
    """What every answer token of a one-picture conversation should have gathered from the
    picture: [number of shapes - 1, colours present (6), kinds present (4), (colour, kind)
    pairs present (24)]; -1 for two pictures."""
    import torch

    width = SUMMARY - 3
    if len(ex.shapes) != 1:
        return torch.full((width,), -1.0)
    shapes = ex.shapes[0]
    pairs = {(s.colour, s.kind) for s in shapes}
    return torch.tensor([len(shapes) - 1] + [float(any(s.colour == c for s in shapes)) for c in S.COLOUR_NAMES]
                        + [float(any(s.kind == k for s in shapes)) for k in S.SHAPES]
                        + [float((c, k) in pairs) for c in S.COLOUR_NAMES for k in S.SHAPES])


def collate(items, pad_id: int):
    import torch

    n = max(len(i[0]) for i in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    weights = torch.zeros((len(items), n))
    mask = torch.zeros((len(items), n), dtype=torch.long)
    focus = torch.zeros((len(items), n), dtype=torch.long)
    edges = torch.zeros((len(items), n), dtype=torch.long)
    query = torch.full((len(items), n, QUERY_COLS), -100, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, :len(it[0])] = it[0]
        weights[r, :len(it[1])] = it[1]
        mask[r, :len(it[0])] = 1
        focus[r, :len(it[6])] = it[6]
        edges[r, :len(it[7])] = it[7]
        query[r, :len(it[8])] = it[8]
    aux = [torch.cat([it[4][k] for it in items]) for k in range(4)]
    summary = torch.stack([it[5] for it in items])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([i[2] for i in items]),
                image_grid_thw=torch.cat([i[3] for i in items])), weights, aux, summary, focus, edges, query


def conversation(rng: random.Random) -> S.Example:
    """Training conversations: 1 to 3 questions about the same pictures (follow-ups in the
    app are turns of one chat), canvases over the whole 320..800 range."""
    turns = rng.choices([1, 2, 3], weights=[5, 3, 2])[0]
    return S.make_example(rng, turns=turns)


def batches(processor, rng: random.Random, batch: int, pool: int = 4):
    """Encoded batches of fresh conversations, `pool` batches drawn at once and grouped by
    length, so that little of a step is spent on padding."""
    while True:
        items = sorted((encode(processor, conversation(rng)) for _ in range(batch * pool)),
                       key=lambda it: len(it[0]))
        groups = [items[k:k + batch] for k in range(0, len(items), batch)]
        rng.shuffle(groups)
        yield from groups


def _losses(model, probes, looking, seen, b, weights, aux_targets, summary, focus, edges, query, word_class,
            image_token: int, centre_col: int):
    """One batch's answer loss, auxiliary loss and the probes' accuracies."""
    import torch

    res = model(**b, output_hidden_states=True)
    logits = res.logits[:, :-1].float()
    target = torch.where(weights[:, 1:] > 0, b["input_ids"][:, 1:], -100)
    tok_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
        reduction="none").view(target.shape)
    lm = (tok_loss * weights[:, 1:]).sum() / weights.sum()
    cls, rel, absolute, owner_of = aux_targets
    pictures = b["input_ids"] == image_token
    aux, acc = probes.loss(seen.pop("v"), res.hidden_states[LM_LAYER][pictures], cls, rel, absolute, owner_of)
    answering = weights[:, 1:] > 0
    rows = answering.nonzero()[:, 0]
    feats = res.hidden_states[LM_LAYER][:, :-1][answering]
    aux = aux + probes.summary_loss(feats, summary[rows], acc)
    aux = aux + probes.query_loss(feats, query[:, 1:][answering], acc)
    after = res.hidden_states[LM_LAYER + 1][:, :-1][answering]
    aux = aux + probes.next_word_loss(after, word_class[b["input_ids"][:, 1:][answering]], acc)
    aux = aux + probes.box_loss(after, query[:, 1:][answering][:, BOX_COLS:], acc)
    owner = torch.full_like(b["input_ids"], -1)
    owner[pictures] = owner_of
    extreme = torch.zeros_like(b["input_ids"])
    extreme[pictures] = edge_bits(cls)
    centre = torch.zeros_like(pictures)
    centre[pictures] = cls[:, centre_col] == 1
    aux = aux + ATTN_WEIGHT * looking.loss(focus[:, 1:], edges[:, 1:], answering, owner, extreme, centre, acc)
    return lm, aux, acc


def _produce(seed: int, batch: int, queue) -> None:
    """The data worker: collated batches from `random.Random(seed)`, as `batches` draws them."""
    import torch

    from engine import tiny

    torch.set_num_threads(1)
    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer, trained=True)
    for items in batches(processor, random.Random(seed), batch):
        queue.put(collate(items, tokenizer.pad_token_id))


def prefetched(seed: int, batch: int, depth: int = 6):
    """`batches`, collated, drawn and encoded in a child process while the model trains on
    the ones before (a fifth of a step's time on 2 cores when done in line); the same
    batches in the same order as drawing them here."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue(depth)
    worker = ctx.Process(target=_produce, args=(seed, batch, queue), daemon=True)
    worker.start()
    try:
        while True:
            yield queue.get()
    finally:
        worker.terminate()


def train(steps: int, batch: int, lr: float, out: Path, log_every: int = 10, seed: int = TRAIN_SEED,
          aux_weight: float = AUX_WEIGHT, answer_box: str = "") -> None:
    """`steps` AdamW steps of `batch` fresh conversations from `random.Random(seed)`, linear
    warm-up then cosine decay to 5 % of `lr`; `answer_box` (ANSWER_BOX) adds that probe."""
    import torch
    from safetensors.torch import save_file

    from engine import tiny

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model, tokenizer, config = tiny.build_untrained()
    with torch.no_grad():
        # A gentler start than the random demo's 0.12.
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(0.02 / tiny.INIT_STD)
    probes = Probes(config.text_config.hidden_size, config.text_config.hidden_size, answer_box)
    image_token = config.image_token_id
    seen = {}
    model.model.visual.register_forward_hook(lambda _m, _i, o: seen.__setitem__("v", o.pooler_output))
    looking = Looking(model.model.language_model.layers)
    model.train()
    params = list(model.parameters()) + probes.parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    word_class = next_word_classes(tokenizer, config.text_config.vocab_size)
    start = last_ckpt = time.monotonic()
    ema = aux_ema = None
    warm = 30
    source = prefetched(seed, batch)
    centre_col = [g for g, _ in GROUPS].index("centre")
    for step in range(1, steps + 1):
        frac = (step - 1) / steps
        cur = lr * min(1.0, step / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur
        b, weights, aux_targets, summary, focus, edges, query = next(source)
        lm, aux, acc = _losses(model, probes, looking, seen, b, weights, aux_targets, summary, focus,
                               edges, query, word_class, image_token, centre_col)
        loss = lm + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = lm.item() if ema is None else 0.95 * ema + 0.05 * lm.item()
        aux_ema = aux.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * aux.item()
        if step % log_every == 0:
            accs = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            print(f"step {step} t={time.monotonic() - start:.0f}s lr={cur:.2e} lm={ema:.3f} "
                  f"aux={aux_ema:.3f} {accs}", flush=True)
        if time.monotonic() - last_ckpt > 120:
            _save(model, out, save_file)
            last_ckpt = time.monotonic()
    source.close()
    _save(model, out, save_file)
    print(f"trained {steps} steps x {batch} conversations in {time.monotonic() - start:.0f}s; "
          f"final ema loss {ema:.3f}; wrote {out}", flush=True)


def _save(model, out: Path, save_file) -> None:
    import torch

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)


# ---- held-out evaluation through the app's path ------------------------------------------

def evaluate(n: int, seed: int = EVAL_SEED, model_dir: Path | None = None, verbose: bool = False,
             weights: Path | None = None) -> dict:
    from PIL import Image  # noqa: F401

    from engine.config import EngineConfig
    from engine.backends.local import LocalEngine
    from engine.types import Conversation, GenerationRequest, ImageInput, Message, SamplingParams

    from engine import tiny

    if model_dir is None:
        import tempfile

        model_dir = tiny.build_tiny(Path(tempfile.mkdtemp(prefix="tiny-eval-")), weights=weights)
    engine = LocalEngine.from_config(EngineConfig(model=str(model_dir), device="cpu", warmup=False))
    rng = random.Random(seed)

    def ask(images, question, max_tokens=200):
        req = GenerationRequest(Conversation([Message("user", question, images=[ImageInput(i) for i in images])]),
                                SamplingParams(max_tokens=max_tokens, temperature=0))
        text, fin = engine.generate(req, timeout=600)
        return text

    res = {"count": 0, "colours": 0, "scenes": 0, "shapes": 0, "json": 0, "iou50": 0, "shape_of": 0, "colour_of": 0,
           "qa": 0, "two": 0, "two_n": 0, "present": dict.fromkeys(S.COLOUR_NAMES, 0),
           "named": dict.fromkeys(S.COLOUR_NAMES, 0)}
    t0 = time.monotonic()
    try:
        for k in range(n):
            img, shapes = S.draw_scene(rng)
            res["scenes"] += 1
            a = ask([img], "How many shapes are there, and what colours are they?")
            ok_n = S.parse_count(a) == len(shapes)
            named, drawn = S.parse_colours(a), {s.colour for s in shapes}
            ok_c = named == drawn
            for c in drawn:
                res["present"][c] += 1
                res["named"][c] += c in named
            res["count"] += ok_n
            res["colours"] += ok_c
            d = ask([img], "Detect the shapes.", 400)
            truth = S.resized_boxes(shapes, img.size)
            found = S.parse_detections(d)
            res["json"] += bool(found)
            ious = S.matched_ious([b for b, _ in found], truth)
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
    named = ", ".join(f"{c} {res['named'][c]}/{res['present'][c]}" for c in S.COLOUR_NAMES)
    return (f"held-out seed {EVAL_SEED}, {res['scenes']} pictures (320..800 px, app pixel bounds, greedy):\n"
            f"  count right:              {pct(res['count'], res['scenes'])}\n"
            f"  exact colour set:         {pct(res['colours'], res['scenes'])}\n"
            f"  detection in JSON boxes:  {pct(res['json'], res['scenes'])} of the answers\n"
            f"  boxes with IoU >= 0.5:    {pct(res['iou50'], res['shapes'])} of {res['shapes']} shapes\n"
            f"  'what shape is the X one' {pct(res['shape_of'], res['qa'])} exact\n"
            f"  'which colour is the X'   {pct(res['colour_of'], res['qa'])} exact\n"
            f"  second-picture colour:    {pct(res['two'], res['two_n'])} of {res['two_n']}\n"
            f"  a colour drawn, named:    {named} (in the count answers)\n"
            f"  ({res['seconds']} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tinylab.train", description=__doc__.splitlines()[0])
    p.add_argument("--eval", action="store_true", help="held-out accuracy of the committed weights")
    p.add_argument("--n", type=int, default=100, help="held-out pictures for --eval")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--aux-weight", type=float, default=AUX_WEIGHT)
    p.add_argument("--eval-weights", type=Path, default=None, help="weights for --eval (default: committed)")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--answer-box", choices=ANSWER_BOX, default="",
                   help="an experiment, not the committed recipe: probe the box after the lookup "
                        "(README runs F: box, G: phase)")
    args = p.parse_args(argv)
    if args.eval_weights is not None and not args.eval_weights.is_file():
        p.error(f"--eval-weights: no such file: {args.eval_weights}")
    if args.eval:
        print(report(evaluate(args.n, verbose=args.verbose, weights=args.eval_weights)))
        return
    t0 = time.monotonic()
    train(args.steps, args.batch, args.lr, args.out, aux_weight=args.aux_weight, answer_box=args.answer_box)
    print(f"total training time {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
