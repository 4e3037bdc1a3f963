"""generate / stream: batched mixed-length prompts, per-request seeds, stop tokens, errors."""

import jax
import numpy as np
import pytest
from decode_cases import BASE, MASKED, T

from sparse_jax.decode.generate import generate, stream
from sparse_jax.decode.sampling import Sampler
from sparse_jax.decode.step import decode_params
from sparse_jax.model.transformer import init_params

NEW = 8


@pytest.fixture(scope="module")
def model():
    params = decode_params(BASE, init_params(BASE, jax.random.key(0)))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 8), 0, BASE.vocab_size))
    # Lengths that are multiples of the prefill chunk share one compiled chunk shape.
    return params, [tokens[0].tolist(), tokens[1, :4].tolist()]


def _run(params, prompts, **kwargs):
    kwargs.setdefault("options", MASKED)
    return generate(BASE, params, prompts, max_new_tokens=NEW, cache_len=T, **kwargs)


@pytest.mark.parametrize(
    "sampler", [Sampler(temperature=0.0), Sampler(temperature=1.0, top_k=20)], ids=str
)
def test_batched_mixed_lengths_equal_one_at_a_time(model, sampler):
    params, prompts = model
    seeds = [3, 11]
    batched = _run(params, prompts, sampler=sampler, seeds=seeds)
    for prompt, seed, tokens in zip(prompts, seeds, batched.tokens, strict=True):
        alone = _run(params, [prompt], sampler=sampler, seeds=seed)
        assert alone.tokens[0] == tokens
    assert [len(t) for t in batched.tokens] == [NEW, NEW]
    assert batched.finish_reasons == ["length", "length"]


def test_stop_token_ends_a_request_without_being_emitted(model):
    params, prompts = model
    free = _run(params, prompts)
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    stopped = _run(params, prompts, stop_tokens=[stop])
    assert stopped.tokens[0] == free.tokens[0][:first]
    assert stopped.finish_reasons[0] == "stop"
    if stop not in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1]


def test_stream_and_callback_see_every_token_in_order(model):
    params, prompts = model
    seen = []
    result = _run(params, prompts, callback=seen.append)
    assert [s.step for s in seen] == list(range(NEW))
    streamed = [[int(s.tokens[i]) for s in seen] for i in range(2)]
    assert streamed == result.tokens
    assert seen[-1].done.all() and not seen[0].done.any()
    steps = list(stream(BASE, params, prompts, max_new_tokens=NEW, options=MASKED, cache_len=T))
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps]).T, result.tokens)
    assert result.stats["steps"] == NEW - 1
    assert result.stats["attn_overflow"].shape == (BASE.num_layers,)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([[1] * (BASE.max_seq_len + 1)], {}, "exceeds the model.s context of 32"),
        ([[1] * (BASE.max_seq_len - 2)], {"max_new_tokens": 5}, "exceeds the model.s context"),
        ([[]], {}, "non-empty"),
        ([[BASE.vocab_size]], {}, "out of range"),
        ([[1, 2]], {"seeds": [1, 2]}, "seeds"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"sampler": Sampler(top_k=BASE.vocab_size + 1)}, "vocabulary"),
        ([[1, 2]], {"cache_len": 2}, "cache_len"),
        ([[1, 2]], {"max_new_tokens": 2.0}, "max_new_tokens"),
        ([[1, 2]], {"max_new_tokens": True}, "max_new_tokens"),
        ([[1, 2]], {"stop_tokens": "5"}, "integer token ids"),
        ([[1, 2]], {"stop_tokens": 2.5}, "stop_tokens"),
    ],
)
def test_bad_requests_raise_clear_errors(model, prompts, kwargs, match):
    params, _ = model
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(BASE, params, prompts, **kwargs)


def test_integer_likes_are_accepted(model):
    params, prompts = model
    want = _run(params, prompts[:1], stop_tokens=[5])
    got = generate(
        BASE,
        params,
        prompts[:1],
        max_new_tokens=np.int64(NEW),
        stop_tokens=np.int32(5),
        cache_len=np.int64(T),
        options=MASKED,
    )
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons


def test_a_prompt_that_fills_the_context_still_yields_one_token(model):
    # The last new token is returned without being fed back: P + N - 1 positions suffice.
    params, _ = model
    context = BASE.max_seq_len
    result = generate(BASE, params, [[1] * context], max_new_tokens=1, options=MASKED)
    assert len(result.tokens[0]) == 1
    with pytest.raises(ValueError, match="needs 33 positions"):
        generate(BASE, params, [[1] * context], max_new_tokens=2, options=MASKED)


def test_stop_tokens_may_be_a_numpy_array(model):
    params, prompts = model
    want = _run(params, prompts[:1], stop_tokens=[5, 7])
    assert _run(params, prompts[:1], stop_tokens=np.asarray([5, 7])).tokens == want.tokens
    with pytest.raises(ValueError, match="stop_tokens"):
        _run(params, prompts[:1], stop_tokens=[[5, 7]])
