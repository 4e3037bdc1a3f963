"""Tokenizer properties: exact round-trips, deterministic training, save/load, clear errors."""

import numpy as np
import pytest

from sparse_jax.data.pipeline import DataConfig, load_documents
from sparse_jax.data.tokenizer import Tokenizer

VOCAB = 1024
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "",
    " leading space, trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "naïve café, Ångström, straße — “quotes” … ﬁ ligature",
    "東京 서울 Москва القاهرة 🙂👍🏽 e\u0301",
    "\x00\x07 control bytes \u200b zero width",
    "x" * 5000,
]


@pytest.fixture(scope="module")
def corpus():
    return load_documents(DataConfig())[:200]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return Tokenizer.train(corpus, VOCAB)


def test_special_ids_and_vocab(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


def test_bos_eos(tokenizer):
    ids = tokenizer.encode("And God said", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode("And God said")
    assert tokenizer.decode(ids) == "And God said"
    assert tokenizer.decode(np.asarray(ids, np.int32)) == "And God said"


def test_subwords_compress_in_domain_text(tokenizer, corpus):
    text = corpus[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 3


def test_encode_batch_matches_encode(tokenizer):
    texts = TEXTS[:5]
    batched = tokenizer.encode_batch(texts, add_bos=True, add_eos=True)
    assert batched == [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]


def test_training_is_deterministic(corpus, tokenizer):
    again = Tokenizer.train(corpus, VOCAB)
    assert again.model_proto == tokenizer.model_proto
    assert again.encode(corpus[3]) == tokenizer.encode(corpus[3])


def test_sampled_training_is_deterministic(corpus):
    first = Tokenizer.train(corpus, 400, max_sentences=50, seed=7)
    second = Tokenizer.train(corpus, 400, max_sentences=50, seed=7)
    assert first == second


def test_save_load(tmp_path, tokenizer):
    path = tokenizer.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.model"
    for source in (path, tmp_path / "ckpt"):
        loaded = Tokenizer.load(source)
        assert loaded == tokenizer
        assert loaded.encode(TEXTS[4]) == tokenizer.encode(TEXTS[4])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer model"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.model"):
        Tokenizer.load(tmp_path / "bad.model")


@pytest.mark.parametrize("ids", [[5, VOCAB], [-1], [0, 1, 10**6]])
def test_decode_out_of_range(tokenizer, ids):
    with pytest.raises(ValueError, match=rf"out of range: ids must be in \[0, {VOCAB}\)"):
        tokenizer.decode(ids)


def test_round_trip_random_unicode(tokenizer):
    rng = np.random.default_rng(0)
    for top in (0x80, 0x3000, 0x110000):
        for _ in range(100):
            points = rng.integers(0, top, size=rng.integers(0, 30))
            text = "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000 and p != 0x2581)
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_space_mark_decodes_as_space(tokenizer):
    # SentencePiece writes spaces as U+2581, so a literal U+2581 cannot survive a round trip.
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


def test_encode_rejects_bad_text(tokenizer):
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.encode("lone \ud800 surrogate")


@pytest.mark.parametrize("vocab_size", [100, 100_000])
def test_bad_vocab_size(corpus, vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        Tokenizer.train(corpus[:5], vocab_size)


def test_empty_training_texts():
    with pytest.raises(ValueError, match="no non-blank line"):
        Tokenizer.train(["", "  \n "], 300)
