"""The built-in tiny Qwen2.5-VL for tests and offline demos, trained on synthetic shapes.

It uses the exact classes of the real Qwen2.5-VL-7B-Instruct
(`Qwen2_5_VLForConditionalGeneration`, `Qwen2_5_VLProcessor` with
`Qwen2VLImageProcessor`, `Qwen2VLVideoProcessor` and a `Qwen2Tokenizer`), the
real chat template and Qwen's special tokens in Qwen's order, but a byte-level
BPE trained on a small fixed English corpus and a model a few MB in size. Its weights are
engine/tiny_weights.safetensors, trained by `python -m tinylab.train` on pictures of
flat coloured shapes (tinylab/shapes.py): it counts them, names their colours and shapes and
detects them in Qwen2.5-VL's grounding JSON; about anything else it knows nothing.
Builds are deterministic (identical bytes every time) and take seconds.

    python -m engine.tiny DIR        # write the folder to DIR and print its path

The folder loads like any local model: `AutoProcessor.from_pretrained(dir)`,
`AutoModelForImageTextToText.from_pretrained(dir)`. It contains a marker file
`tiny_model.json` ({"tiny": true, "version": N}); see `is_tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

TINY_VERSION = 7
# The pixel bounds of the trained model's processor: the size its pictures were trained at.
MODEL_MIN_PIXELS = 56 * 56
MODEL_MAX_PIXELS = 100 * 28 * 28
# What the built-in model knows, as measured on 100 held-out pictures (tinylab/README.md,
# v7): stated here once, written into the folder's marker, and read from there by the log,
# the page's banner and the API's model card.
TRAINED_KNOWS = ("it was trained only on pictures of 1 to 4 flat circles, squares, triangles and "
                 "stars in six plain colours; it counts them (right 88 times in 100), names all "
                 "their colours right 4 times in 5, the shape or colour you ask about right 2 to "
                 "3 times in 5, its detection boxes are still wrong, and it knows nothing else")
RANDOM_KNOWS = "its weights are random, so its answers are random text"
WEIGHTS = Path(__file__).with_name("tiny_weights.safetensors")
MARKER = "tiny_model.json"

# Building seeds the global torch RNG; serialise builds within one process.
_BUILD_LOCK = threading.Lock()

# The processor's chat template of Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's added tokens, in Qwen's order (real ids 151643..151664). The first 14
# are special; the tool/FIM tokens are ordinary added tokens, as in the real tokenizer.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
EXTRA_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# Same pre-tokenisation regex as Qwen2 (transformers' PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BPE_VOCAB_SIZE = 1024  # 256 byte tokens + up to 768 merges (the corpus yields about 600)
INIT_STD = 0.12

_CORPUS = """\
The image shows a red circle, a blue square, a green triangle and a yellow star on a white background.
This picture is a bar chart with a title, labelled axes and the value of each bar written above it.
A receipt from a small shop lists the items bought, the quantity, the price of each line and the total.
The street sign says MAIN ST in white letters on a green board, and below it there is a red STOP sign.
The diagram has four boxes joined by arrows: Upload, then Preprocess, then NPU, then Answer.
Please describe this image in detail. What is written on the sign? How much is the total?
Which month had the highest sales? Count the shapes and name their colours.
The assistant looks at the picture carefully and answers the question in a few clear sentences.
There is a person walking a dog along the road next to a tall building with many windows.
A cat is sleeping on a sofa in the living room, and the afternoon sun comes through the window.
The weather today is sunny with a light breeze; tomorrow there may be some rain in the evening.
In the first image there are two cars parked outside a house; in the second image the street is empty.
The video shows a man riding a bicycle through the park while children play football on the grass.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 50 100 2024 3.14 $29.29 45% 8:30.
The model reads text in the image, recognises objects and reasons about what it sees.
You are a helpful assistant. I am happy to help. Here is a short description of the scene.
First, the user uploads an image and asks a question. Then the processor resizes the image,
splits it into patches and turns the text into tokens. The language model generates the answer
one token at a time and streams it back to the user, who can stop the generation at any moment.
Colours: red, orange, yellow, green, blue, purple, pink, brown, black, white and grey.
Shapes: circle, square, rectangle, triangle, star, hexagon, octagon, line and arrow.
It is a photograph of a mountain lake at sunrise, with pine trees on the shore and snow on the peaks.
The table has three columns and five rows; the last row shows the sum of the values above it.
How many shapes are there, and what colours are they? There are 3 shapes: a red circle, a blue square and a green triangle.
There is 1 shape: a yellow star. There are 4 shapes: a red star, an orange circle, a purple square and a purple triangle.
What shape is the red one? The red one is a circle. Which shape is blue? There are 2 blue shapes: a square and a star.
Which colour is the star? The star is yellow. What colour is the triangle? There is no triangle. There is no green shape.
There are 2 circles: a red one and an orange one. What colour is the shape in the second picture? The shape in the first picture is purple.
Detect the shapes and output their bounding boxes in JSON format. Detect all shapes in the image and return their locations as JSON.
```json
[
	{"bbox_2d": [120, 56, 310, 248], "label": "red circle"},
	{"bbox_2d": [402, 371, 589, 530], "label": "green star"},
	{"bbox_2d": [64, 197, 143, 276], "label": "purple triangle"}
]
```
"""


def _corpus_lines() -> list[str]:
    # Repeat so that frequent pairs clearly win; the order is fixed, so training is deterministic.
    lines = [ln for ln in _CORPUS.splitlines(keepends=True) if ln.strip()]
    return lines * 3


def build_tokenizer():
    """Return a `Qwen2Tokenizer` with a freshly trained byte-level BPE and Qwen's added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    def new_backend(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    trained = new_backend(models.BPE())
    trained.train_from_iterator(_corpus_lines(), trainer=trainer)

    # Re-create the model from the learned vocab/merges with the exact options
    # Qwen2's tokenizer.json uses (no unk token, no byte fallback).
    state = json.loads(trained.to_str())
    vocab = state["model"]["vocab"] if "model" in state else state["vocab"]
    merges = state["model"]["merges"] if "model" in state else state["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    backend = new_backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # Added tokens get consecutive ids right after the BPE vocab, in Qwen's order.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_ADDED_TOKENS])

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=131072,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
    )
    base = len(vocab)
    for i, t in enumerate(SPECIAL_TOKENS + EXTRA_ADDED_TOKENS):
        got = tokenizer.convert_tokens_to_ids(t)
        if got != base + i:  # pragma: no cover - guards against library changes
            raise RuntimeError(f"tiny tokenizer: {t} has id {got}, expected {base + i}")
    return tokenizer


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


# Sizes of the built-in model (tinylab/train.py trains it; head_dim 32 everywhere:
# vLLM's CPU attention refuses 16).
TEXT_DIMS = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)
VISION_DIMS = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                   fullatt_block_indexes=[0, 1, 2, 3])
# Rotary positions for 16 frequency pairs (the real model: 64 pairs, base 1e6, [16, 24, 24]).
# Qwen's mrope gives the highest frequencies to time, then rows, then columns. Base 1000 with
# [2, 5, 9] leaves rows 0.42..0.075 and columns 0.049..0.0016 radians per step: enough to tell
# a picture's rows and columns apart, and a few pairs that barely turn over a whole chat, so
# that an answer can find picture tokens by content however far back they are (base 100 left
# none: every pair turned by a radian or more within 100 tokens).
ROPE_THETA = 1000.0
MROPE_SECTION = [2, 5, 9]


def build_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_hidden = TEXT_DIMS["hidden_size"]
    heads = TEXT_DIMS["num_attention_heads"]
    head_dim = text_hidden // heads
    text_config = dict(
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_act="silu",
        max_position_embeddings=32768,
        # 0.02 (the real default) makes the random model fall into a two-token loop
        # after a few tokens; 0.12 gives mixed, prompt-dependent output.
        initializer_range=INIT_STD,
        rms_norm_eps=1e-6,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=TEXT_DIMS["num_hidden_layers"],
        attention_dropout=0.0,
        # Real model: [16, 24, 24] for head_dim 128; must sum to head_dim / 2.
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": list(MROPE_SECTION)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        **TEXT_DIMS,
    )
    assert head_dim >= 32
    assert sum(text_config["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision_config = dict(
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=text_hidden,
        initializer_range=INIT_STD,
        **VISION_DIMS,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_generation_config(tokenizer, repetition_penalty: float = 1.0):
    from transformers import GenerationConfig

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The real generation_config.json's values, except the repetition penalty: the real
    # 1.05 bends the trained model's JSON boxes (repeated digits), so 1.0 (none) here.
    # top_k=1 makes sampling exactly greedy, so the defaults are deterministic.
    return GenerationConfig(
        bos_token_id=eot,
        pad_token_id=eot,
        eos_token_id=[im_end, eot],
        do_sample=True,
        repetition_penalty=repetition_penalty,
        temperature=0.1,
        top_p=0.001,
        top_k=1,
    )


def build_processor(tokenizer, trained: bool = False):
    """The processor; the trained model's caps pictures at the size it was trained at
    (MODEL_MAX_PIXELS), the random one's is the real preprocessor_config.json's
    (min_pixels 3136, max_pixels 12845056)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    longest = MODEL_MAX_PIXELS if trained else 28 * 28 * 16384
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MODEL_MIN_PIXELS if trained else 56 * 56, "longest_edge": longest},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def weights_sha256(path: Path | None = None) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path or WEIGHTS).read_bytes()).hexdigest()
    except OSError:
        return None


def load_trained(model, path: Path | None = None) -> None:
    """Copy the trained weights (stored as float16) into `model` (float32)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path or WEIGHTS))
    own = model.state_dict()
    missing = set(own) - set(state)
    if missing or any(state[k].shape != own[k].shape for k in own):
        raise RuntimeError(f"{path} does not fit the tiny model's config (retrain: python -m tinylab.train)")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def build_untrained(attn_implementation: str | None = "sdpa"):
    """(model, tokenizer, config): the tiny model freshly initialised from torch's current
    seed, float32; what build_tiny saves, tinylab/train.py trains and
    tinylab/probe.py loads trained weights into (None: the config's own attention)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    # Rows past the tokenizer (vocab_size is rounded up, like the real 152064 vs
    # 151665) get zero weights, so greedy decoding never picks an id the
    # tokenizer cannot decode.
    n_tok = len(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_tok:] = 0
        model.get_output_embeddings().weight[n_tok:] = 0
    return model, tokenizer, config


def build_tiny(dest: str | Path, trained: bool = True, weights: Path | None = None) -> Path:
    """Write a complete tiny Qwen2.5-VL model folder to `dest` and return its path: the
    trained weights when `trained` (and engine/tiny_weights.safetensors exists), else the
    random initialisation."""
    import torch

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    sha = weights_sha256(weights) if trained else None
    with _BUILD_LOCK:
        rng_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)
            model, tokenizer, _config = build_untrained(attn_implementation=None)
        finally:
            torch.random.set_rng_state(rng_state)
    processor = build_processor(tokenizer, trained=sha is not None)
    if sha is not None:
        load_trained(model, weights)
    model.eval()
    model.config.dtype = torch.float32
    model.generation_config = build_generation_config(tokenizer, 1.0 if sha else 1.05)

    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    (dest / MARKER).write_text(
        json.dumps(
            {
                "tiny": True,
                "version": TINY_VERSION,
                "trained": sha is not None,
                "weights_sha256": sha,
                "knows": TRAINED_KNOWS if sha else RANDOM_KNOWS,
                "description": (
                    "Tiny Qwen2.5-VL trained on synthetic pictures of flat coloured shapes "
                    "(tinylab/train.py); it knows nothing else." if sha else
                    "Tiny randomly initialised Qwen2.5-VL (engine/tiny.py); outputs are meaningless."),
            },
            indent=2,
        )
        + "\n"
    )
    return dest


def describe(model_dir: str | Path) -> dict:
    """What a tiny folder's marker says of it: {"trained": bool, "description": str,
    "knows": str} (a marker written before "knows" existed gets the statement of its kind)."""
    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        marker = {}
    trained = bool(marker.get("trained"))
    return {"trained": trained, "description": str(marker.get("description") or ""),
            "knows": str(marker.get("knows") or (TRAINED_KNOWS if trained else RANDOM_KNOWS))}


def is_tiny(model_dir: str | Path) -> bool:
    """True when `model_dir` is a folder written by `build_tiny`."""
    try:
        return bool(json.loads((Path(model_dir) / MARKER).read_text()).get("tiny"))
    except (OSError, ValueError, AttributeError):
        return False


def default_cache_root() -> Path:
    """Where `ensure_tiny` keeps built folders: $QWENVL_DEMO_CACHE, else ~/.cache/qwen-vl-npu-demo."""
    env = os.environ.get("QWENVL_DEMO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen-vl-npu-demo"


def _complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("version") == TINY_VERSION
        and marker.get("weights_sha256") == weights_sha256()
        and (folder / "model.safetensors").is_file()
        and (folder / "config.json").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """Return `<cache>/tiny-v{N}`, building it once.

    `cache_dir` defaults to `$QWENVL_DEMO_CACHE` or `~/.cache/qwen-vl-npu-demo`.
    The folder is built in a temporary sibling and renamed into place, so
    concurrent callers never see a half-written model.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"tiny-v{TINY_VERSION}"
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-v{TINY_VERSION}-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        build_tiny(tmp)
        # mkdtemp makes a 0700 folder; make the cache readable like a normal download.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if final.exists() and not _complete(final):
            # A leftover broken folder (not produced by this code's rename): move it aside.
            stale = root / f".stale-{uuid.uuid4().hex[:8]}"
            try:
                final.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            tmp.rename(final)
        except OSError:
            # Someone else won the race; their folder is complete (rename is atomic).
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.tiny", description="Write the tiny Qwen2.5-VL model folder.")
    p.add_argument("dest", type=Path, help="folder to write (created if missing)")
    p.add_argument("--random", action="store_true", help="random weights instead of the trained ones")
    args = p.parse_args(argv)
    print(build_tiny(args.dest, trained=not args.random).resolve())


if __name__ == "__main__":
    main()
