"""The conversation cache against its oracle: greedy outputs with prefix-cache hits,
encoder-cache hits, both, a hit inside a batch and after an eviction equal
`model.generate` on the same inputs (the cache off), token for token; the caches really
hit (cached tokens in the stats, encoder hits), and stay within their budgets."""

from __future__ import annotations

import pytest
from PIL import Image

from support import tiny_engine_with
from engine.types import (Conversation, GenerationRequest, ImageInput, Message,
                          SamplingParams)

from tests.test_scheduler import Run, expected


def picture(seed: int, size=(448, 336)) -> Image.Image:
    """A picture whose content depends on the seed (same size for every seed)."""
    img = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    for i in range(0, size[0], 32):
        img.paste((seed * 13 % 256, 255 - i % 256, i % 256), (i, 0, i + 8, size[1]))
    return img


def chat(*turns: str | tuple[str, list], system: str | None = "Be brief.",
         max_tokens: int = 20) -> GenerationRequest:
    """Alternating user/assistant turns; a user turn may carry pictures: (text, [images])."""
    messages = []
    for i, turn in enumerate(turns):
        text, images = turn if isinstance(turn, tuple) else (turn, [])
        messages.append(Message("user" if i % 2 == 0 else "assistant", text,
                                images=[ImageInput(im) for im in images]))
    return GenerationRequest(Conversation(messages, system=system),
                             SamplingParams(max_tokens=max_tokens, temperature=0,
                                            ignore_eos=True))


def run(engine, req):
    r = Run(engine, req)
    text, tokens = r.result()
    return text, tokens, r.finished.stats.cached_tokens


@pytest.fixture
def engine(tiny_model_dir):
    eng = tiny_engine_with(tiny_model_dir, max_model_len=4096)
    yield eng
    eng.close()


def test_follow_up_turn_reuses_the_chat_and_equals_generate(engine):
    pics = [picture(1), picture(2)]
    first = chat(("What is in these?", pics))
    answer, _, cached = run(engine, first)
    assert cached == 0
    second = chat(("What is in these?", pics), answer, "And the colours?")
    got_text, got_tokens, cached = run(engine, second)
    assert (got_text, got_tokens) == expected(engine, second)
    prompt = engine.render(second).prompt_tokens
    assert cached >= engine.render(first).prompt_tokens - 16   # the whole first turn
    assert cached < prompt


def test_same_picture_in_a_new_chat_hits_the_encoder_cache(engine):
    pic = picture(3)
    run(engine, chat(("Describe it.", [pic])))
    figures = engine.cache_stats()
    other = chat(("What colour dominates?", [pic]), system="Answer in French.")
    got_text, got_tokens, cached = run(engine, other)
    assert (got_text, got_tokens) == expected(engine, other)
    after = engine.cache_stats()
    assert after["encoder_cache_hits"] == figures["encoder_cache_hits"] + 1
    assert after["encoder_cache_misses"] == figures["encoder_cache_misses"]


def test_two_users_with_the_same_picture_share_it_inside_a_batch(engine):
    pic = picture(4)
    run(engine, chat(("Describe it.", [pic])))          # cached now
    reqs = [chat(("Describe it.", [pic]), max_tokens=30), chat(("Describe it.", [pic]),
                                                               max_tokens=25),
            chat(("Something else entirely", [picture(5)]), max_tokens=20)]
    refs = [expected(engine, r) for r in reqs]
    first = Run(engine, reqs[0])
    first.wait_tokens(2)
    runs = [first, Run(engine, reqs[1]), Run(engine, reqs[2])]
    assert [r.result() for r in runs] == refs
    assert runs[0].finished.stats.cached_tokens > 0 and runs[1].finished.stats.cached_tokens > 0
    assert engine.snapshot().largest_batch >= 2


def test_after_evictions_answers_stay_exact_and_memory_within_budget(tiny_model_dir):
    budget = 64 * 1024                      # 8 blocks of the tiny model's 16 tokens
    eng = tiny_engine_with(tiny_model_dir, max_model_len=2048, prefix_cache_gib=budget / 2 ** 30)
    try:
        for seed in range(6):              # distinct chats push each other out
            req = chat((f"Chat {seed}", [picture(10 + seed)]))
            assert run(eng, req)[:2] == expected(eng, req)
            figures = eng.snapshot()
            assert 0 < figures.prefix_cache_allocated_bytes <= budget
            assert 0 < figures.prefix_cache_bytes <= budget
        again = chat(("Chat 0", [picture(10)]))             # its blocks were evicted
        assert run(eng, again)[:2] == expected(eng, again)
    finally:
        eng.close()


def test_no_prefix_cache_turns_both_caches_off(tiny_model_dir):
    eng = tiny_engine_with(tiny_model_dir, max_model_len=2048, prefix_cache=False)
    try:
        req = chat(("Describe it.", [picture(6)]))
        assert run(eng, req)[2] == 0
        text, tokens, cached = run(eng, req)
        assert cached == 0 and (text, tokens) == expected(eng, req)
        figures = eng.snapshot()
        assert figures.encoder_cache_hits == 0
        assert figures.prefix_cache_queries is None and "prefix_cache_hits" not in figures.caches()
    finally:
        eng.close()


def test_a_different_picture_of_the_same_size_is_not_taken_for_the_cached_one(engine):
    """Placeholder ids are equal for equal sizes: the block keys carry the content."""
    run(engine, chat(("Describe it.", [picture(7)])))
    other = chat(("Describe it.", [picture(8)]))
    prompt = engine.render(other)
    image_start = prompt.media[0].start
    got_text, got_tokens, cached = run(engine, other)
    assert cached <= image_start                 # at most the text before the picture
    assert (got_text, got_tokens) == expected(engine, other)
