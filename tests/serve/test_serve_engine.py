"""The batching engine: slot insertion, per-row sampling, tokens equal to generating alone."""

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_cases import VARIANTS
from tolerances import F32_VS_F64

from sparse_jax.decode.cache import init_cache
from sparse_jax.decode.generate import generate
from sparse_jax.decode.sampling import GREEDY, Sampler, sample, step_keys
from sparse_jax.decode.step import (
    DecodeOptions,
    decode_params,
    decode_step,
    decode_step_jit,
    prefill,
)
from sparse_jax.model.transformer import init_params
from sparse_jax.serve.engine import SERVING_OPTIONS, Engine
from sparse_jax.serve.row_sampling import RowSettings, sample_rows, settings_arrays
from sparse_jax.serve.slots import insert_rows, prefill_group
from sparse_jax.serve.tickets import EngineBusy, Request

SAMPLERS = [
    GREEDY,
    Sampler(temperature=0.7),
    Sampler(temperature=1.0, top_k=5),
    Sampler(temperature=1.3, top_p=0.8),
    Sampler(temperature=0.9, top_k=20, top_p=0.9),
]
# Prompt lengths cross the local window (6) and the prefill chunk (4): rings wrap.
OPTIONS = DecodeOptions(prefill_chunk=4)


@pytest.fixture(scope="module", params=["spark", "dense"])
def model(request):
    cfg = VARIANTS[request.param]
    return cfg, decode_params(cfg, init_params(cfg, jax.random.key(0)))


def _prompts(cfg, count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, rng.integers(1, 15)).tolist() for _ in range(count)]


def test_each_row_samples_as_the_batch_sampler_would():
    logits = jax.random.normal(jax.random.key(3), (len(SAMPLERS), 97)) * 3
    seeds, steps = [5, 17, 29, 41, 53], [0, 3, 1, 7, 2]
    arrays = settings_arrays(
        [RowSettings.from_sampler(s, seed) for s, seed in zip(SAMPLERS, seeds, strict=True)]
    )
    for trial in range(4):  # new steps: new draws
        got = sample_rows(
            logits,
            arrays["seeds"],
            jnp.asarray(steps, jnp.int32) + trial,
            arrays["temperature"],
            arrays["top_k"],
            arrays["top_p"],
        )
        for row, sampler in enumerate(SAMPLERS):
            keys = step_keys(jnp.asarray([seeds[row]], jnp.int32), jnp.int32(steps[row] + trial))
            want = sample(logits[row : row + 1], keys, sampler)
            assert int(got[row]) == int(want[0]), (trial, sampler)


def test_an_inserted_row_continues_exactly_like_its_own_cache(model):
    cfg, params = model
    slots, prompt = 3, _prompts(cfg, 1, seed=1)[0] + [7] * 6
    shared = init_cache(cfg, slots)
    for _ in range(9):  # move the shared cursor off zero and fill the other rows
        _, shared, _ = decode_step_jit(cfg, OPTIONS, params, shared, jnp.arange(slots) + 1)
    logits_new, fresh = prefill_group(cfg, params, [prompt], OPTIONS, 1)
    shared = insert_rows(shared, fresh, jnp.asarray([1], jnp.int32))
    pos = np.asarray(shared.layers[-1]["pos"][1])  # the global layer keeps the whole prompt
    assert sorted(pos[pos >= 0].tolist()) == list(range(len(prompt)))
    assert int(shared.next_pos[1]) == len(prompt)
    alone = init_cache(cfg, 1, cfg.max_seq_len)
    logits_alone, alone, _ = prefill(cfg, params, alone, np.asarray([prompt]), None, OPTIONS)
    np.testing.assert_allclose(logits_new[0], logits_alone[0], **F32_VS_F64)
    for token in [3, 9, 27, 81, 50, 11, 2, 60]:  # past the local window of 6
        got, shared, _ = decode_step_jit(cfg, OPTIONS, params, shared, jnp.asarray([0, token, 5]))
        want, alone, _ = decode_step(cfg, params, alone, np.asarray([token]), OPTIONS)
        np.testing.assert_allclose(got[1], want[0], **F32_VS_F64)


def test_concurrent_requests_get_the_tokens_they_get_alone(model):
    cfg, params = model
    prompts = _prompts(cfg, 10, seed=2)
    engine = Engine(cfg, params, slots=4, options=OPTIONS, max_prefill_group=2).start()
    results = {}

    def run(i):
        sampler = SAMPLERS[i % len(SAMPLERS)]
        request = Request(tuple(prompts[i]), 4 + i % 5, RowSettings.from_sampler(sampler, i))
        results[i] = engine.generate(request)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    status = engine.status()
    assert status["finished_length"] == len(prompts) and status["active"] == 0
    generated = sum(len(tokens) for tokens, _ in results.values())
    assert status["decode_steps"] < generated - len(prompts)  # requests shared steps
    assert status["resizes"] >= 4  # grew 1 -> 2 -> 4 rows, compacted back as requests ended
    engine.generate(Request((1, 2), 2))
    assert engine.status()["rows"] == 1  # a lone request decodes alone
    engine.close()
    for i, prompt in enumerate(prompts):
        alone = generate(
            cfg,
            params,
            [prompt],
            max_new_tokens=4 + i % 5,
            sampler=SAMPLERS[i % len(SAMPLERS)],
            seeds=i,
            options=OPTIONS,
            cache_len=cfg.max_seq_len,
        )
        assert results[i] == (alone.tokens[0], "length"), i


@pytest.fixture(scope="module")
def engine(model):
    cfg, params = model
    engine = Engine(cfg, params, slots=2, options=OPTIONS, max_queue=1).start()
    yield engine
    engine.close()


def test_a_stop_token_ends_the_request_without_being_emitted(model, engine):
    cfg, _ = model
    prompt = tuple(_prompts(cfg, 1, seed=3)[0])
    free, _ = engine.generate(Request(prompt, 8))
    stop = free[3]
    tokens, reason = engine.generate(Request(prompt, 8, stop_tokens=(stop,)))
    assert (tokens, reason) == (free[: free.index(stop)], "stop")


def _wait_until(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cancel_frees_the_slot_and_a_full_queue_is_refused(engine):
    release, events = threading.Event(), []

    def blocking(event):  # holds the engine thread: nothing moves while it waits
        events.append(event)
        release.wait(timeout=60)

    first = engine.submit(Request((1, 2, 3), 20), blocking)
    _wait_until(lambda: events)  # admitted: the queue is empty again
    queued = engine.submit(Request((4,), 20), lambda e: None)
    with pytest.raises(EngineBusy, match="already waiting"):
        engine.submit(Request((5,), 20), lambda e: None)
    first.cancel()
    queued.cancel()
    release.set()
    _wait_until(lambda: not engine.status()["active"] and not engine.status()["queued"])
    assert first.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert events[-1].finish_reason == "cancelled" and 1 <= first.generated < 20
    assert engine.generate(Request((1, 2, 3), 3))[1] == "length"


@pytest.mark.parametrize(
    "request_, match",
    [
        (Request((), 4), "non-empty"),
        (Request((1, 500), 4), "out of range"),
        (Request((1,) * 30, 4), "exceeds the model.s context"),
        (Request((1,), 0), "max_tokens"),
        (Request((1,), 4, RowSettings(top_k=1000)), "vocabulary"),
    ],
    ids=["empty", "token", "context", "max_tokens", "top_k"],
)
def test_bad_requests_are_refused_before_queueing(engine, request_, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(request_, lambda e: None)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    def broken():
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "_decode_rows", broken)
    ticket = engine.submit(Request((1, 2), 5), lambda e: None)
    _wait_until(lambda: ticket.finish_reason is not None)
    monkeypatch.undo()
    assert ticket.finish_reason == "error"
    assert engine.generate(Request((1, 2), 5))[1] == "length"
    assert engine.status()["running"]


def test_the_decode_options_are_used_as_given(model):
    cfg, params = model
    assert Engine(cfg, params, options=OPTIONS).options == OPTIONS
    assert Engine(cfg, params).options.prefill_chunk == SERVING_OPTIONS.prefill_chunk


def test_warmup_reports_each_compiled_program(model, caplog):
    cfg, params = model
    engine = Engine(cfg, params, slots=2, options=OPTIONS, max_prefill_group=2)
    steps = len(engine._warmup_steps())
    with caplog.at_level(logging.INFO, logger="sparse_jax.serve.engine"):
        engine.start(warmup=True)
    engine.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled ")]
    assert [line.split()[1] for line in lines] == [f"{i}/{steps}:" for i in range(1, steps + 1)]
    assert any("decode step (2-row cache)" in line for line in lines)
    assert any("prefill (group of 2," in line for line in lines)
    assert lines[-1].startswith(f"compiled {steps}/{steps}: cache 2 -> 1 rows")
