"""Bad requests to the server: each a 4xx with an OpenAI-style message, and serving goes on."""

import asyncio
import json
import math
import random

import httpx
import jax
import openai
import pytest
from micro_configs import micro_train_configs as micro_configs
from openai.types.completion_create_params import CompletionCreateParamsBase
from serve_cases import serving

from sparse_jax.data.pipeline import DataConfig, load_documents
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.model.transformer import init_params
from sparse_jax.serve.app import ServerSettings, create_app, longest_piece
from sparse_jax.serve.engine import Engine
from sparse_jax.serve.protocol import CompletionRequest

NAME, KEY = "micro", "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT, BODY_LIMIT = 8, 16384


class SpyTokenizer(Tokenizer):
    """Counts encodes, and those run on a thread with a running event loop."""

    encodes, on_loop = 0, 0

    def encode(self, text, add_bos=False, add_eos=False):
        self.encodes += 1
        try:
            asyncio.get_running_loop()
            self.on_loop += 1
        except RuntimeError:
            pass
        return super().encode(text, add_bos=add_bos, add_eos=add_eos)


@pytest.fixture(scope="module")
def tokenizer():
    cfg, _ = micro_configs()
    docs = load_documents(DataConfig())[:100]
    return SpyTokenizer(Tokenizer.train(docs, cfg.vocab_size).model_proto)


@pytest.fixture(scope="module")
def url(tokenizer):
    cfg, _ = micro_configs()  # context 32
    engine = Engine(cfg, init_params(cfg, jax.random.key(0)), slots=2)
    settings = ServerSettings(
        NAME, api_key=KEY, max_tokens_limit=LIMIT, max_request_bytes=BODY_LIMIT
    )
    with serving(create_app(engine, tokenizer, settings)) as base:
        yield base


def _body(**fields):
    return json.dumps({"model": NAME, "prompt": "In the beginning", **fields}).encode()


CASES = {
    "malformed_json": (b'{"model": "micro", "prompt": ', 400, "not valid JSON"),
    "not_an_object": (b"[1, 2]", 400, "must be a JSON object"),
    "nan": (b'{"model": "micro", "prompt": "a", "temperature": NaN}', 400, "NaN"),
    "missing_prompt": (json.dumps({"model": NAME}).encode(), 400, "prompt is required"),
    "prompt_type": (_body(prompt=5), 400, "prompt: must be a non-empty string"),
    "prompt_empty": (_body(prompt=""), 400, "prompt"),
    "max_tokens_type": (_body(max_tokens="4"), 400, "max_tokens: Input should be a valid integer"),
    "max_tokens_bool": (_body(max_tokens=True), 400, "max_tokens"),
    "max_tokens_zero": (_body(max_tokens=0), 400, "greater than or equal to 1"),
    "max_tokens_limit": (_body(max_tokens=LIMIT + 1), 400, f"limit of {LIMIT}"),
    "temperature_type": (_body(temperature="hot"), 400, "temperature"),
    "temperature_range": (_body(temperature=3.0), 400, "less than or equal to 2"),
    "top_p_range": (_body(top_p=0.0), 400, "top_p"),
    "top_k_type": (_body(top_k=2.5), 400, "top_k"),
    "top_k_vocab": (_body(top_k=100_000), 400, "vocabulary"),
    "seed_negative": (_body(seed=-1), 400, "seed"),
    "stream_type": (_body(stream="yes"), 400, "stream"),
    "stop_type": (_body(stop=["ok", 3]), 400, "stop: must be a non-empty string"),
    "stop_count": (_body(stop=list("abcde")), 400, "up to 4 non-empty strings"),
    "n": (_body(n=2), 400, "n=2 is not supported: this server returns one completion"),
    "n_zero": (_body(n=0), 400, "n: Input should be greater than or equal to 1"),
    "best_of": (_body(best_of=3), 400, "best_of=3 is not supported"),
    "frequency_penalty": (_body(frequency_penalty=0.5), 400, "frequency_penalty=0.5 is not"),
    "presence_penalty": (_body(presence_penalty=-1), 400, "presence_penalty=-1.0 is not"),
    "penalty_range": (_body(presence_penalty=3), 400, "presence_penalty: Input should be less"),
    "logit_bias": (_body(logit_bias={"5": 10}), 400, "logit_bias={'5': 10.0} is not supported"),
    "logit_bias_range": (_body(logit_bias={"5": 200}), 400, "logit_bias"),
    "logprobs": (_body(logprobs=1), 400, "logprobs=1 is not supported: this server returns no"),
    "suffix": (_body(suffix="end"), 400, "suffix='end' is not supported"),
    "prompt_batch": (_body(prompt=["a", "b"]), 400, "a batch of 2 prompts"),
    "prompt_token_range": (_body(prompt=[1, 100_000]), 400, "out of range"),
    "prompt_token_type": (_body(prompt=[1, 2.5]), 400, "list of token ids"),
    "prompt_tokens_too_long": (_body(prompt=[5] * 40), 400, "exceeds the model's context"),
    "unknown_field": (_body(penalty=0.5), 400, "unknown field 'penalty'"),
    "unknown_nested": (_body(stream_options={"x": 1}), 400, "unknown field 'stream_options.x'"),
    "too_long_prompt": (_body(prompt="the word " * 40), 400, "the model's context of 32"),
    "prompt_just_too_long": (_body(prompt="the word " * 11), 400, "exceeds the model's context"),
    "deep_array": (b"[" * 5000, 400, "nests arrays or objects too deeply"),
    "deep_object": (b'{"a": ' * 2500, 400, "nests arrays or objects too deeply"),
    "deep_closed": (b"[" * 2000 + b"]" * 2000, 400, "too deeply"),
    "deep_field": (
        _body()[:-1] + b', "user": ' + b"[" * 900 + b"]" * 900 + b"}",
        400,
        "user: Input should be a valid string",
    ),
    "deep_in_field": (_body()[:-1] + b', "user": ' + b"[" * 5000, 400, "too deeply"),
    "lone_surrogate": (_body(prompt="a\ud800"), 400, "not valid Unicode"),
    "huge_integer": (_body(seed=10**30), 400, "seed: Input should be less than"),
    "huge_float": (_body()[:-1] + b', "top_p": 1e999}', 400, "top_p: Input should be a finite"),
    "not_utf8": (b'{"model": "micro", "prompt": "\xe9"}', 400, "not valid JSON"),
    "wrong_model": (_body(model="gpt-4"), 404, "model 'gpt-4' does not exist"),
    "too_large": (_body(prompt="x" * BODY_LIMIT), 413, f"over {BODY_LIMIT} bytes"),
}


def _assert_error(response, status, fragment):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["type"] and set(error) == {"message", "type", "param", "code"}


def _still_serving(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    ok = httpx.post(
        f"{url}/v1/completions",
        content=_body(max_tokens=3, temperature=0),
        headers=AUTH,
        timeout=120,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_bad_request_gets_a_4xx_message_and_the_server_goes_on(url, case):
    content, status, fragment = CASES[case]
    response = httpx.post(f"{url}/v1/completions", content=content, headers=AUTH, timeout=60)
    _assert_error(response, status, fragment)
    _still_serving(url)


def test_an_oversized_chunked_body_is_refused(url):
    chunks = (b"x" * 1024 for _ in range(20))  # no Content-Length: counted as it arrives
    response = httpx.post(f"{url}/v1/completions", content=chunks, headers=AUTH)
    _assert_error(response, 413, f"over {BODY_LIMIT} bytes")
    _still_serving(url)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_is_401(url, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
        response = httpx.request(method, f"{url}{path}", content=_body(), headers=headers)
        _assert_error(response, 401, "API key")
    assert httpx.get(f"{url}/health", headers=headers).json() == {"status": "ok"}
    _still_serving(url)


def test_health_gives_details_only_with_the_key(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    details = httpx.get(f"{url}/health", headers=AUTH).json()
    assert details["status"] == "ok" and details["model"] == NAME and details["slots"] == 2
    assert "tokens" in details and "decode_steps" in details


def test_unknown_routes_and_methods_get_json_errors(url):
    _assert_error(httpx.get(f"{url}/v1/engines", headers=AUTH), 404, "Not Found")
    _assert_error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405, "Method Not Allowed")
    _still_serving(url)


def test_the_openai_client_raises_its_own_error_types(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match=f"limit of {LIMIT}"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=LIMIT + 1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"frequency_penalty=0\.5 is not supported"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="logprobs=2 is not supported"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, logprobs=2)
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="model 'org/other' does not exist"):
        client.models.retrieve("org/other")
    client.api_key = "wrong"
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.models.list()


def test_the_openapi_document_declares_the_completion_body(url):
    document = httpx.get(f"{url}/openapi.json").json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] and schema["required"] == ["model", "prompt"]
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == list(CompletionRequest.model_fields)
    assert set(CompletionCreateParamsBase.__annotations__) <= set(schema["properties"])
    assert "$ref" not in json.dumps(schema)  # self-contained: no components to resolve
    assert schema["properties"]["stream_options"]["anyOf"][0]["properties"]["include_usage"]


def test_a_too_long_prompt_is_refused_before_it_is_tokenized(url, tokenizer):
    encodes = tokenizer.encodes
    prompt = "x" * (BODY_LIMIT - 100)
    response = httpx.post(f"{url}/v1/completions", content=_body(prompt=prompt), headers=AUTH)
    _assert_error(response, 400, f"the prompt's {len(prompt)} characters are at least")
    assert "exceed the model's context of 32 tokens" in response.json()["error"]["message"]
    assert tokenizer.encodes == encodes
    _still_serving(url)  # this one is tokenized, on a worker thread
    assert tokenizer.encodes > encodes and tokenizer.on_loop == 0


def test_the_cheap_length_bound_never_exceeds_the_token_count(tokenizer):
    chars = longest_piece(tokenizer)
    pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    longest = max(pieces, key=len)
    rng = random.Random(0)
    texts = [longest * 50, " " * 300, "\u2581" * 50, "\U0001f600" * 40, "a\n" * 100, "\x00" * 9]
    texts += ["".join(rng.choices(pieces, k=60)) for _ in range(20)]
    texts += ["".join(map(chr, rng.choices(range(32, 0x3000), k=200))) for _ in range(5)]
    for text in texts:
        fewest = 1 + math.ceil(len(text) / chars)
        assert len(tokenizer.encode(text, add_bos=True)) >= fewest, text[:40]


@pytest.mark.parametrize(
    "key", ["", "   ", " key", "key\n"], ids=["empty", "blank", "lead", "trail"]
)
def test_an_empty_or_padded_api_key_is_refused(key):
    with pytest.raises(ValueError, match=r"ServerSettings\.api_key (is empty|starts or ends)"):
        ServerSettings(NAME, api_key=key)
