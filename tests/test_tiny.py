"""The built-in tiny Qwen2.5-VL (engine/tiny.py) behaves like a real local model folder;
tests/test_tiny_semantic.py checks what its trained weights answer."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import tiny  # noqa: E402

PIXELS = {"min_pixels": 224 * 224, "max_pixels": 1280 * 28 * 28}


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return transformers.AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return transformers.AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


def _image(size=(448, 448), color=(200, 30, 30)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.ellipse([size[0] // 8, size[1] // 8, size[0] // 2, size[1] // 2], fill=color)
    d.rectangle([size[0] // 2, size[1] // 2, size[0] - 20, size[1] - 20], fill=(20, 60, 200))
    return img


def _inputs(processor, content):
    from qwen_vl_utils import process_vision_info

    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    return processor(text=[text], images=images, videos=videos, return_tensors="pt")


def test_folder_contents_and_marker(tiny_model_dir):
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        tiny.MARKER,
    ):
        assert (tiny_model_dir / name).is_file(), name
    assert tiny.is_tiny(tiny_model_dir)
    assert json.loads((tiny_model_dir / tiny.MARKER).read_text())["version"] == tiny.TINY_VERSION
    assert tiny_model_dir.name == f"tiny-v{tiny.TINY_VERSION}"


def test_loads_with_auto_classes(processor, model):
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.float32


def test_ids_match_tokenizer(processor, model):
    tok, cfg = processor.tokenizer, model.config
    base = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert ids == list(range(base, base + 14))  # Qwen's order, consecutive
    assert base == len(tok) - len(tiny.SPECIAL_TOKENS) - len(tiny.EXTRA_ADDED_TOKENS)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == base + 12
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == base + 13
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>") == base + 9
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>") == base + 10
    assert processor.image_token_id == cfg.image_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == base + 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == base
    text = cfg.get_text_config()
    assert text.eos_token_id == tok.eos_token_id
    assert text.pad_token_id == tok.pad_token_id
    assert text.bos_token_id == base
    assert len(tok) <= text.vocab_size < len(tok) + 64
    gen = model.generation_config
    assert gen.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert gen.pad_token_id == tok.pad_token_id


def test_shapes_fit_vllm_cpu(model):
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim >= 32
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    vision = model.config.vision_config
    assert vision.hidden_size // vision.num_heads >= 32
    assert vision.out_hidden_size == text.hidden_size
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)


def test_chat_template_matches_qwen(processor):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "x.png"},
                {"type": "video", "video": "y.mp4"},
                {"type": "text", "text": "Describe."},
            ],
        },
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "More?"},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\nOk.<|im_end|>\n"
        "<|im_start|>user\nMore?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = processor.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    numbered = processor.apply_chat_template(messages[:1], tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Video 1: <|vision_start|>" in numbered


def test_image_placeholder_count(processor, model, tmp_path):
    # The trained model's processor caps a picture at the size it was trained at (100 tokens);
    # the random build keeps the real preprocessor_config.json's bounds.
    content = [{"type": "image", "image": _image(), **PIXELS}, {"type": "text", "text": "What?"}]
    inputs = _inputs(processor, content)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 100
    assert inputs["image_grid_thw"].tolist() == [[1, 20, 20]]
    from transformers import AutoProcessor

    rnd = AutoProcessor.from_pretrained(tiny.build_tiny(tmp_path / "random", trained=False))
    assert _inputs(rnd, content)["image_grid_thw"].tolist() == [[1, 32, 32]]


def test_shapes_boxes_are_in_the_pixels_the_model_sees(processor):
    """tinylab/shapes.py's resized frame (the app's resize, then the processor's) is the
    processor's own, for canvases over the whole training range."""
    import random

    from tinylab import shapes as S

    rng = random.Random(3)
    for _ in range(12):
        size = (rng.randint(320, 800), rng.randint(320, 800))
        inputs = _inputs(processor, [{"type": "image", "image": _image(size), **PIXELS},
                                     {"type": "text", "text": "?"}])
        _, gh, gw = inputs["image_grid_thw"][0].tolist()
        assert S.model_size(size) == (gw * 14, gh * 14), size


def test_generate_is_prompt_dependent(processor, model):
    outs = []
    for content in (
        [{"type": "image", "image": _image(), **PIXELS}, {"type": "text", "text": "Describe this image."}],
        [{"type": "text", "text": "Tell me a story about a cat."}],
    ):
        inputs = _inputs(processor, content)
        out = model.generate(**inputs, max_new_tokens=20)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert new, new
        again = model.generate(**inputs, max_new_tokens=20)
        assert again[0, inputs["input_ids"].shape[1] :].tolist() == new  # deterministic defaults
        assert all(i < len(processor.tokenizer) for i in new)
        outs.append(new)
    assert outs[0] != outs[1]


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    a = tiny.build_tiny(tmp_path / "a")
    tiny.main([str(tmp_path / "b")])  # the CLI writes the same folder
    b = tmp_path / "b"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # and the cached session build is the same model
    assert (a / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_trained_weights_and_the_random_build(tmp_path, tiny_model_dir, model):
    marker = json.loads((tiny_model_dir / tiny.MARKER).read_text())
    if not tiny.WEIGHTS.is_file():
        pytest.skip("no trained weights")
    assert marker["trained"] and marker["weights_sha256"] == tiny.weights_sha256()
    assert tiny.WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    assert model.generation_config.repetition_penalty == 1.0
    rnd = tiny.build_tiny(tmp_path / "random", trained=False)
    assert not json.loads((rnd / tiny.MARKER).read_text())["trained"]
    assert (rnd / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (rnd / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_ensure_tiny_reuses_cache(tiny_model_dir):
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    again = tiny.ensure_tiny(tiny_model_dir.parent)
    assert again == tiny_model_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_ensure_tiny_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_DEMO_CACHE", str(tmp_path))
    assert tiny.default_cache_root() == tmp_path
    assert not tiny.is_tiny(tmp_path)
