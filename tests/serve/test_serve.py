"""The HTTP server over a trained checkpoint: the openai client, 32 clients, disconnects."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from serve_cases import NAME, PROMPTS, serving, wait_until

from sparse_jax.decode.generate import generate
from sparse_jax.decode.sampling import GREEDY, Sampler
from sparse_jax.serve.app import ServerSettings, create_app
from sparse_jax.serve.engine import Engine
from sparse_jax.serve.loading import load
from sparse_jax.serve.textgen import TextGenerator


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint):
    return served_checkpoint


@pytest.fixture(scope="module")
def served(checkpoint):
    model = load(checkpoint)
    engine = Engine(model.config, model.params, slots=8).start(warmup=True)
    app = create_app(engine, model.tokenizer, ServerSettings(NAME, max_tokens_limit=48))
    with serving(app) as url:
        yield url, engine, TextGenerator(model)


def _client(url, **kwargs):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kwargs)


def test_openai_client_gets_whole_and_streamed_completions(served):
    url, _, generator = served
    client = _client(url)
    assert [m.id for m in client.models.list()] == [NAME]
    want = generator.complete(PROMPTS[1], max_tokens=12, sampler=GREEDY)
    whole = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert whole.choices[0].text == want.text and want.text
    assert whole.choices[0].finish_reason == want.finish_reason
    assert whole.usage.prompt_tokens == want.prompt_tokens
    assert whole.usage.completion_tokens == want.completion_tokens
    chunks = list(
        client.completions.create(
            model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == want.finish_reason


def test_seeded_sampling_matches_the_one_prompt_generator(served):
    url, _, generator = served
    sampler = Sampler(temperature=0.8, top_k=20, top_p=0.9)
    want = generator.complete(PROMPTS[1], max_tokens=12, sampler=sampler, seed=11).text
    for _ in range(2):
        got = _client(url).completions.create(
            model=NAME,
            prompt=PROMPTS[1],
            max_tokens=12,
            temperature=0.8,
            top_p=0.9,
            seed=11,
            extra_body={"top_k": 20},
        )
        assert got.choices[0].text == want


def test_a_stop_string_cuts_the_text(served):
    url, _, generator = served
    full = generator.complete(PROMPTS[1], max_tokens=12, sampler=GREEDY).text
    stop = full[4:7]
    got = _client(url).completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "\x00"]
    )
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_get_single_request_greedy_text(served):
    url, engine, generator = served
    cfg, tokenizer = generator.config, generator.tokenizer
    longest = 16
    tokens = {}
    for prompt in PROMPTS:  # one request at a time, as generate() runs it alone
        ids = generator.encode_prompt(prompt, longest)
        result = generate(
            cfg,
            generator.params,
            [ids],
            max_new_tokens=longest,
            stop_tokens=(tokenizer.eos_id,),
            cache_len=cfg.max_seq_len,
        )
        tokens[prompt] = result.tokens[0]
    before = engine.status()

    async def client_session(client, index):
        texts = []
        for turn in range(3):
            prompt = PROMPTS[(index + turn) % len(PROMPTS)]
            max_tokens = (6, 9, 12, 16)[(index + turn) % 4]
            kwargs = dict(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
            if (index + turn) % 2:
                stream = await client.completions.create(**kwargs, stream=True)
                text = "".join([c.choices[0].text async for c in stream])
            else:
                text = (await client.completions.create(**kwargs)).choices[0].text
            texts.append((prompt, max_tokens, text))
        return texts

    async def main():
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        return await asyncio.gather(*(client_session(client, i) for i in range(32)))

    sessions = asyncio.run(main())
    results = [r for session in sessions for r in session]
    assert len(results) == 96
    for prompt, max_tokens, text in results:
        # The completion's text as it reads after the prompt (leading space kept).
        ids = tokenizer.encode(prompt, add_bos=True)
        full = tokenizer.decode(ids + list(tokens[prompt][:max_tokens]))
        assert text == full[len(tokenizer.decode(ids)) :], (prompt, max_tokens)
    after = engine.status()
    generated = after["tokens"] - before["tokens"]
    assert after["active"] == 0 and after.get("finished_error", 0) == 0
    assert after["decode_steps"] - before["decode_steps"] < generated / 4  # steps were shared


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_disconnects_frees_its_slot(served, monkeypatch, stream):
    url, engine, _ = served
    decode_rows = engine._decode_rows

    def slow_decode_rows():  # 40 tokens take seconds: the client leaves long before the end
        time.sleep(0.05)
        return decode_rows()

    monkeypatch.setattr(engine, "_decode_rows", slow_decode_rows)
    before = engine.status()
    body = dict(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=stream)
    with httpx.Client(base_url=url, timeout=1.0) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as response:
                first = next(response.iter_lines())
                assert first.startswith("data: ") and json.loads(first[6:])["choices"]
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body)
    wait_until(lambda: engine.status()["active"] == 0, timeout=10)
    after = engine.status()
    assert after["finished_cancelled"] == before.get("finished_cancelled", 0) + 1
    assert after.get("finished_length") == before.get("finished_length")


def test_openai_fields_at_neutral_values_are_accepted(served):
    url, _, generator = served
    client = _client(url)
    want = generator.complete(PROMPTS[2], max_tokens=10, sampler=GREEDY)
    neutral = dict(
        logprobs=None,
        echo=False,
        frequency_penalty=0,
        presence_penalty=0,
        n=1,
        best_of=1,
        user="someone",
        suffix=None,
        logit_bias={},
        seed=5,
        stop=[],
    )
    got = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0, **neutral
    )
    assert got.choices[0].text == want.text
    # As some clients send them: every field, null where it has no value.
    nulls = dict.fromkeys(["max_tokens", "n", "stop", "seed", "top_p", "stream", "suffix"])
    extra = {**nulls, "top_k": None, "logit_bias": {"5": 0}, "stream_options": None}
    got = client.completions.create(model=NAME, prompt=PROMPTS[2], temperature=0, extra_body=extra)
    # max_tokens null is OpenAI's default of 16.
    assert got.usage.completion_tokens == 16 or got.choices[0].finish_reason == "stop"
    assert got.choices[0].text.startswith(want.text)


def test_echo_token_prompts_and_usage_in_a_stream(served):
    url, _, generator = served
    client = _client(url)
    want = generator.complete(PROMPTS[3], max_tokens=8, sampler=GREEDY)
    kwargs = dict(model=NAME, max_tokens=8, temperature=0)
    echoed = client.completions.create(prompt=PROMPTS[3], echo=True, **kwargs)
    assert echoed.choices[0].text == PROMPTS[3] + want.text
    ids = generator.encode_prompt(PROMPTS[3], 8)  # BOS included: token prompts are used as given
    for prompt in (ids, [ids], [PROMPTS[3]]):
        assert client.completions.create(prompt=prompt, **kwargs).choices[0].text == want.text
    chunks = list(
        client.completions.create(
            prompt=PROMPTS[3],
            stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False},
            echo=True,
            **kwargs,
        )
    )
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == PROMPTS[3] + want.text
    assert all(c.usage is None for c in text_chunks) and last.choices == []
    assert last.usage.completion_tokens == want.completion_tokens
    assert last.usage.prompt_tokens == want.prompt_tokens


def test_a_model_is_retrieved_by_id(served):
    url, _, _ = served
    client = _client(url)
    model = client.models.retrieve(NAME)
    assert model.id == NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError, match="model 'other' does not exist"):
        client.models.retrieve("other")
    missing = httpx.get(f"{url}/v1/models/other").json()["error"]
    assert missing["code"] == "model_not_found" and missing["param"] == "model"
