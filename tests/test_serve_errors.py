"""Bad requests to the server: each a 4xx with an OpenAI-style message, and serving goes on."""

import json

import httpx
import jax
import openai
import pytest
from test_serve import serving
from test_training import micro_configs

from sparse_jax.data import DataConfig, load_documents
from sparse_jax.model import init_params
from sparse_jax.server.app import ServerSettings, create_app
from sparse_jax.server.engine import Engine
from sparse_jax.tokenizer import Tokenizer

NAME, KEY = "micro", "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT, BODY_LIMIT = 8, 4096


@pytest.fixture(scope="module")
def url():
    cfg, _ = micro_configs()  # context 32
    docs = load_documents(DataConfig(vocab_size=cfg.vocab_size))[:100]
    tokenizer = Tokenizer.train(docs, cfg.vocab_size)
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
    "prompt_type": (_body(prompt=5), 400, "prompt: Input should be a valid string"),
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
    "n": (_body(n=2), 400, "n: Input should be less than or equal to 1"),
    "unknown_field": (_body(frequency_penalty=0.5), 400, "unknown field 'frequency_penalty'"),
    "unknown_nested": (_body(stream_options={"x": 1}), 400, "unknown field 'stream_options.x'"),
    "too_long_prompt": (_body(prompt="the word " * 40), 400, "exceed the model's context of 32"),
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
    chunks = (b"x" * 1024 for _ in range(8))  # no Content-Length: counted as it arrives
    response = httpx.post(f"{url}/v1/completions", content=chunks, headers=AUTH)
    _assert_error(response, 413, "over 4096 bytes")
    _still_serving(url)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_is_401(url, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions")]:
        response = httpx.request(method, f"{url}{path}", content=_body(), headers=headers)
        _assert_error(response, 401, "API key")
    assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    _still_serving(url)


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
    client.api_key = "wrong"
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.models.list()
