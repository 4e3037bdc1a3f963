"""Sampler statistics: greedy, temperature, top-k, top-p and min-p; per-row seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.decode.sampling import GREEDY, Sampler, filter_logits, sample, step_keys

DRAWS = 20_000
PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _draws(logits_row, sampler, seed=0):
    """DRAWS samples of one row: the row repeated, one key per copy."""
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (DRAWS, len(logits_row)))
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    return np.asarray(jax.jit(sample, static_argnums=2)(logits, keys, sampler))


def _frequencies(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / tokens.size


def test_temperature_zero_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (5, 40))
    keys = jax.random.split(jax.random.key(1), 5)
    want = np.argmax(logits, -1)
    np.testing.assert_array_equal(sample(logits, keys, GREEDY), want)
    np.testing.assert_array_equal(sample(logits, keys, Sampler(0.0, top_k=3, top_p=0.5)), want)


def test_temperature_one_matches_the_softmax():
    freq = _frequencies(_draws(np.log(PROBS), Sampler(temperature=1.0)), 4)
    # Binomial standard error at 20k draws is at most 0.0035.
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_temperature_sharpens_and_flattens():
    logits = np.log(PROBS)
    for temperature in (0.5, 2.0):
        want = PROBS ** (1 / temperature)
        freq = _frequencies(_draws(logits, Sampler(temperature=temperature), seed=1), 4)
        np.testing.assert_allclose(freq, want / want.sum(), atol=0.015)


def test_top_k_never_emits_outside_the_k_most_likely():
    logits = np.asarray(jax.random.normal(jax.random.key(2), (64,))) * 0.3
    tokens = _draws(logits, Sampler(temperature=1.5, top_k=5), seed=2)
    allowed = set(np.argsort(-logits)[:5].tolist())
    assert set(tokens.tolist()) == allowed


def test_top_p_samples_the_smallest_nucleus_renormalised():
    # Mass before the third token is 0.8 >= 0.7: the nucleus is the first two tokens.
    freq = _frequencies(_draws(np.log(PROBS), Sampler(top_p=0.7), seed=3), 4)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    assert freq[2:].sum() == 0


def test_top_p_keeps_the_top_token_even_below_its_mass():
    filtered = filter_logits(jnp.log(jnp.asarray([PROBS])), Sampler(top_p=0.1))
    assert np.isfinite(np.asarray(filtered)).tolist() == [[True, False, False, False]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    # min_p 0.2 of a top probability 0.5: tokens below 0.1 go.
    freq = _frequencies(_draws(np.log(PROBS), Sampler(min_p=0.2), seed=4), 4)
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)


def test_a_row_samples_the_same_token_alone_or_in_a_batch():
    logits = jax.random.normal(jax.random.key(5), (6, 50))
    seeds = jnp.arange(6, dtype=jnp.int32) * 11
    sampler = Sampler(temperature=1.0, top_k=20)
    draw = jax.jit(lambda lg, s: sample(lg, step_keys(s, jnp.int32(3)), sampler))
    batch = draw(logits, seeds)
    for row in range(6):
        assert int(draw(logits[row : row + 1], seeds[row : row + 1])[0]) == int(batch[row])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(top_k=0),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
    ],
)
def test_bad_sampler_parameters_raise(kwargs):
    with pytest.raises(ValueError, match="Sampler"):
        Sampler(**kwargs)


def test_top_k_larger_than_the_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler(top_k=100).check_vocab(50)
