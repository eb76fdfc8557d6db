"""POST /v1/completions and /invocations through HTTP on the tiny model: greedy answers
equal transformers' own generate on the same token ids, logprobs equal log_softmax of the
model's logits, the stream joins to the JSON answer, and vLLM 0.32's shapes, indices and
refusals (its wording, checked against `vllm serve` on the same tiny folder)."""

from __future__ import annotations

import json

import pytest
import torch

from support import guard_loopback  # noqa: F401 (autouse: loopback only)

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from server.background import BackgroundServer  # noqa: E402
from server.routes import create_api_app  # noqa: E402

PROMPT = "There are 3 shapes:"
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def http(tiny_engine):
    with BackgroundServer(create_api_app(tiny_engine)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tok(tiny_engine):
    return tiny_engine.tokenizer


def complete(http, path: str = "/v1/completions", **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http, **body) -> list:
    """The stream's events, parsed (the final "[DONE]" kept as it is)."""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    return [ln[6:] if ln == "data: [DONE]" else json.loads(ln[6:]) for ln in lines]


def refused(http, path: str = "/v1/completions", **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def greedy_oracle(engine, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of `ids` (n tokens, EOS ignored) and the log_softmax
    of the logits each new token was chosen from."""
    model = engine.loaded.model
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    return out.sequences[0, len(ids):].tolist(), logprobs


# --------------------------------------------------------------------------- answers
def test_greedy_completion_equals_generate(http, tiny_engine, tok):
    ids = tok.encode(PROMPT)
    body = complete(http, prompt=PROMPT, max_tokens=8, **GREEDY)
    new, _ = greedy_oracle(tiny_engine, ids, 8)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == tok.decode(new, skip_special_tokens=True)
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    assert body["usage"] == {**body["usage"], "prompt_tokens": len(ids), "completion_tokens": 8,
                             "total_tokens": len(ids) + 8}


def test_default_max_tokens_is_16(http):
    body = complete(http, prompt=PROMPT, **GREEDY)
    assert body["usage"]["completion_tokens"] == 16


def test_token_id_prompt_equals_text_prompt(http, tok):
    by_text = complete(http, prompt=PROMPT, max_tokens=6, **GREEDY)
    by_ids = complete(http, prompt=tok.encode(PROMPT), max_tokens=6, **GREEDY)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]


def test_stream_joins_to_the_json_answer(http):
    whole = complete(http, prompt=PROMPT, max_tokens=40, **GREEDY)
    events = stream(http, prompt=PROMPT, max_tokens=40, stream_options={"include_usage": True},
                    **GREEDY)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) > 1 and "usage" not in chunks[0]   # it really streamed
    assert usage["choices"] == [] and usage["usage"] == {
        k: whole["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_logprobs_equal_log_softmax_and_have_vllms_shape(http, tiny_engine, tok):
    ids = tok.encode(PROMPT)
    body = complete(http, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY)
    new, oracle = greedy_oracle(tiny_engine, ids, 6)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["tokens"] == [tok.decode([t]) for t in new]
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    expected = [oracle[i, t].item() for i, t in enumerate(new)]
    assert lp["token_logprobs"] == pytest.approx(expected, abs=1e-3)
    for i, (token, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])):
        assert list(top)[0] == token and 2 <= len(top) <= 3   # the chosen one, then the top 2
        best = oracle[i].topk(2)
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best.values.tolist(),
                                                                       abs=1e-3)
    streamed = stream(http, prompt=PROMPT, max_tokens=6, logprobs=2, **GREEDY)[:-1]
    joined = {k: [x for c in streamed for x in c["choices"][0]["logprobs"][k]] for k in lp}
    assert joined["text_offset"] == lp["text_offset"] and joined["tokens"] == lp["tokens"]
    assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)


def test_n_choices_are_indexed(http):
    body = complete(http, prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=5,
                    ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 8
    prompt_tokens = complete(http, prompt=PROMPT, max_tokens=1)["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens   # the prompt counted once


def test_a_batch_of_prompts_answers_each_in_order(http):
    prompts = [PROMPT, "One red circle and"]
    alone = [complete(http, prompt=p, max_tokens=5, **GREEDY)["choices"][0]["text"]
             for p in prompts]
    body = complete(http, prompt=prompts, max_tokens=5, **GREEDY)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == alone


def test_batch_times_n_is_prompt_major(http):
    prompts = [PROMPT, "One red circle and"]
    body = complete(http, prompt=prompts, n=2, max_tokens=3, temperature=1.0, seed=1, echo=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"].startswith(prompts[c["index"] // 2]) for c in body["choices"]] == [True] * 4
    events = stream(http, prompt=prompts, n=2, max_tokens=3, temperature=1.0, seed=1, echo=True)
    texts: dict[int, str] = {}
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(texts[i].startswith(prompts[i // 2]) for i in texts)


def test_echo_prepends_the_prompt(http, tok):
    plain = complete(http, prompt=PROMPT, max_tokens=4, **GREEDY)["choices"][0]["text"]
    assert complete(http, prompt=PROMPT, max_tokens=4, echo=True,
                    **GREEDY)["choices"][0]["text"] == PROMPT + plain
    by_ids = complete(http, prompt=tok.encode(PROMPT), max_tokens=4, echo=True, **GREEDY)
    assert by_ids["choices"][0]["text"] == tok.decode(tok.encode(PROMPT)) + plain
    only = complete(http, prompt=PROMPT, max_tokens=0, echo=True)
    assert only["choices"][0]["text"] == PROMPT


def test_echo_with_logprobs_covers_the_prompt(http, tok):
    ids = tok.encode(PROMPT)
    choice = complete(http, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                      **GREEDY)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(ids)
    assert str(ids[1]) in choice["prompt_logprobs"][1]
    events = stream(http, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, **GREEDY)
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == choice["text"]


def test_return_token_ids(http, tok):
    ids = tok.encode(PROMPT)
    choice = complete(http, prompt=PROMPT, max_tokens=3, return_token_ids=True,
                      **GREEDY)["choices"][0]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 3
    assert tok.decode(choice["token_ids"]) == choice["text"]


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "hi", "suffix": "x"}, "suffix", "FIM completion rendering"),
    ({"prompt": "hi", "suffix": "x", "echo": True}, "suffix", "Echo is unsupported with suffix"),
    ({"prompt": "hi", "best_of": 2}, "best_of", "best_of must be 1"),
    ({"prompt": "hi", "use_beam_search": True, "stream": True}, None,
     "Streaming is not currently supported with beam search"),
    ({"prompt": ""}, "prompt", "Either prompt or prompt_embeds must be provided"),
    ({"max_tokens": 3}, "prompt", "Either prompt or prompt_embeds must be provided"),
    ({"prompt": []}, None, "You must pass at least one prompt"),
    ({"prompt": [[]]}, None, "The decoder prompt cannot be empty"),
    ({"prompt": ["hi", ""]}, None, "The decoder prompt cannot be empty"),
    ({"prompt": [1, 10**8]}, None, "Token id 100000000 is out of vocabulary"),
    ({"prompt": "hi", "logprobs": -2}, "logprobs", "must be a positive value or -1"),
    ({"prompt": "hi", "logprobs": "x"}, "logprobs", "`logprobs` must be an integer"),
    ({"prompt": "hi", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs",
     "not available when `stream=True`"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     "only be defined when `stream=True`"),
    ({"prompt": "hi", "guided_json": {"type": "object"}}, "guided_json", "guided_json"),
])
def test_refusals_name_the_field(http, body, param, words):
    error = refused(http, **body)
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param
    assert error["type"] in ("BadRequestError", "Bad Request") and error["code"] == 400


def test_negative_token_id_is_a_validation_error(http):
    assert refused(http, prompt=[1, -1])["param"].startswith("body.prompt")


def test_unknown_fields_are_ignored_with_a_warning(http, caplog):
    caplog.set_level("WARNING", logger="server")
    body = complete(http, prompt=PROMPT, max_tokens=2, made_up_field=1)
    assert body["choices"][0]["text"]
    assert any("made_up_field" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- /invocations
def test_invocations_dispatch_on_the_body(http):
    text = complete(http, "/invocations", prompt=PROMPT, max_tokens=3, **GREEDY)
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == complete(http, prompt=PROMPT, max_tokens=3,
                                                  **GREEDY)["choices"][0]["text"]
    chat = complete(http, "/invocations", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3)
    assert chat["object"] == "chat.completion"
    error = refused(http, "/invocations", max_tokens=3)
    assert "Either prompt or prompt_embeds must be provided" in error["message"]
