"""One length rule for the model's context: the forward, generation and text prompts agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from micro_configs import model_variants

from sparse_jax.data.pipeline import DataConfig, load_documents
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.model.config import as_count, check_context
from sparse_jax.model.transformer import forward, init_params
from sparse_jax.serve.textgen import encode_prompt

CFG = model_variants((True, False), (True, False))["spark"]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_forward_refuses_a_sequence_past_the_context(params):
    context = CFG.max_seq_len
    logits, _ = jax.jit(lambda p, t: forward(CFG, p, t))(params, jnp.ones((1, context), jnp.int32))
    assert logits.shape == (1, context, CFG.vocab_size)
    too_long = jnp.ones((1, context + 1), jnp.int32)
    with pytest.raises(ValueError, match=f"{context + 1} tokens.*context of {context}"):
        forward(CFG, params, too_long)
    with pytest.raises(ValueError, match="context"):
        jax.jit(lambda p, t: forward(CFG, p, t))(params, too_long)


@pytest.mark.parametrize("prompt_len", [1, 7, 32])
def test_check_context_boundary(prompt_len):
    fits = CFG.max_seq_len - prompt_len + 1
    check_context(CFG.max_seq_len, prompt_len, fits)
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        check_context(CFG.max_seq_len, prompt_len, fits + 1)


def test_check_context_refuses_a_prompt_longer_than_the_context():
    with pytest.raises(ValueError, match="33 tokens: it exceeds the model's context of 32"):
        check_context(32, 33, 1)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(3, True), (np.int64(3), True), (np.int32(1), True), (0, False), (-1, False), (True, False),
     (2.0, False), ("3", False), (None, False)],
)  # fmt: skip
def test_as_count_takes_integer_likes_only(value, ok):
    if ok:
        assert as_count(value, "n") == int(value)
        assert type(as_count(value, "n")) is int
    else:
        with pytest.raises(ValueError, match=r"n=.* must be an integer >= 1"):
            as_count(value, "n")


def test_text_prompts_follow_the_same_rule():
    # encode_prompt used to refuse P + N = context + 1, which generation accepts.
    tokenizer = Tokenizer.train(load_documents(DataConfig())[:100], 512)
    ids = tokenizer.encode("In the beginning", add_bos=True)
    fits = CFG.max_seq_len - len(ids) + 1
    assert encode_prompt(tokenizer, CFG.max_seq_len, "In the beginning", fits) == ids
    assert encode_prompt(tokenizer, CFG.max_seq_len, "In the beginning", np.int64(fits)) == ids
    with pytest.raises(ValueError, match="exceeds the model's context"):
        encode_prompt(tokenizer, CFG.max_seq_len, "In the beginning", fits + 1)
