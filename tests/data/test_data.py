"""Data pipeline properties: corpus loading, disjoint split, packed batches, exact resume."""

import dataclasses
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparse_jax.data import corpus
from sparse_jax.data import pipeline as data
from sparse_jax.data.tokenizer import Tokenizer

CFG = data.DataConfig(seq_len=32, batch_size=8, eval_batches=3)
VOCAB = 600


@pytest.fixture(scope="module")
def kjv():
    return data.load_documents(data.DataConfig())


@pytest.fixture(scope="module")
def docs(kjv):
    return kjv[:60]


@pytest.fixture(scope="module")
def tokenizer(docs):
    return data.build_tokenizer(CFG, docs, VOCAB)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_kjv_corpus(kjv):
    assert len(kjv) == 1189  # chapters of the King James Bible
    assert all(doc.strip() for doc in kjv)
    assert kjv[0].startswith("In the beginning God created the heaven and the earth. And")
    assert sum(map(len, kjv)) > 4_000_000


def test_config_errors():
    cases = {
        "seq_len": 0,
        "batch_size": -1,
        "eval_fraction": 1.0,
        "eval_batches": True,
        "tokenizer_path": 123,
        "paths": "corpus.txt",
        "text_field": "",
    }
    for field, value in cases.items():
        with pytest.raises(ValueError, match=f"DataConfig.{field}="):
            data.DataConfig(**{field: value})
    assert data.DataConfig(paths=["a.txt"]).paths == ("a.txt",)
    docs = ["a line of text"] * 4
    with pytest.raises(ValueError, match=r"seed=4294967296 is invalid"):
        data.train_iterator(data.DataConfig(seq_len=2), None, docs, seed=2**32)
    with pytest.raises(ValueError, match=r"seed=-1 is invalid"):
        data.build_tokenizer(data.DataConfig(), docs, 600, seed=-1)
    with pytest.raises(ValueError, match=r"vocab_size=100 is invalid: must be an integer >= 260"):
        data.build_tokenizer(data.DataConfig(), docs, 100)


def test_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\n \n\nSecond one.\n\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        '{"body": "from jsonl", "id": 1}\n\n{"body": "  "}\n{"body": "again"}\n'
    )
    (tmp_path / "ignored.csv").write_text("x,y")
    expected = ["First paragraph\nstill first.", "Second one.", "from jsonl", "again"]
    for paths in [(str(tmp_path),), (str(tmp_path / "**" / "*"),)]:
        cfg = data.DataConfig(paths=paths, text_field="body")
        assert data.load_documents(cfg) == expected
    cfg = data.DataConfig(paths=(str(tmp_path / "a.txt"),))
    assert data.load_documents(cfg) == expected[:2]


def test_each_file_is_read_once_through_symlinks_and_loops(tmp_path):
    (tmp_path / "a.txt").write_text("only once")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "also once"}\n')
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop
    (tmp_path / "same.txt").symlink_to(tmp_path / "a.txt")
    outside = tmp_path.parent / f"{tmp_path.name}_linked"
    outside.mkdir()
    (outside / "c.txt").write_text("linked in")
    (tmp_path / "linked").symlink_to(outside, target_is_directory=True)
    expected = ["only once", "linked in", "also once"]  # path order: a, linked/c, sub/b
    assert data.load_documents(data.DataConfig(paths=(str(tmp_path),))) == expected
    twice = (str(tmp_path / "a.txt"), str(tmp_path), str(tmp_path / "same.txt"))
    assert data.load_documents(data.DataConfig(paths=twice)) == expected
    pattern = (str(tmp_path / "**" / "*.txt"),)
    assert data.load_documents(data.DataConfig(paths=pattern)) == ["only once", "linked in"]


def test_corpus_errors(tmp_path):
    def load(*paths, text_field="text"):
        return data.load_documents(data.DataConfig(paths=paths, text_field=text_field))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        load(str(tmp_path / "*.txt"))
    (tmp_path / "empty.txt").write_text(" \n\n \n")
    with pytest.raises(ValueError, match="no non-blank document"):
        load(str(tmp_path / "empty.txt"))
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        load(str(tmp_path / "notes.md"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:2: no string field 'text' \(keys \['content'\]"
    ):
        load(str(bad))
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        load(str(bad))
    bad.write_text('{"text": "ok"}\n\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        load(str(bad))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load(str(tmp_path / "latin1.txt"))


def test_split(kjv):
    train, held_out = corpus.split_documents(kjv, 0.02, seed=0)
    assert len(held_out) == round(0.02 * len(kjv))
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(kjv)
    assert corpus.split_documents(kjv, 0.02, seed=0) == (train, held_out)
    assert corpus.split_documents(kjv[::-1], 0.02, seed=0) == (train[::-1], held_out[::-1])
    assert corpus.split_documents(kjv, 0.02, seed=1)[1] != held_out
    assert corpus.split_documents(kjv, 0.0, seed=0) == (kjv, [])


def test_split_keeps_duplicates_together():
    docs = [f"doc {i}" for i in range(20)] * 3
    train, held_out = corpus.split_documents(docs, 0.1, seed=3)
    assert held_out and not set(train) & set(held_out)
    with pytest.raises(ValueError, match="leaves no training document"):
        corpus.split_documents(["only one"], 0.5, seed=0)


def test_train_batches_are_packed_windows(tokenizer, docs):
    stream = data.tokenize_documents(tokenizer, docs)
    assert stream[0] == tokenizer.bos_id and stream[-1] == tokenizer.eos_id
    it = data.train_iterator(CFG, tokenizer, docs)
    assert it.num_windows == (len(stream) - 1) // CFG.seq_len
    window_of = {
        stream[i * CFG.seq_len : (i + 1) * CFG.seq_len + 1].tobytes(): i
        for i in range(it.num_windows)
    }
    seen = []
    for batch in take(it, 2 * it.num_windows // CFG.batch_size):
        assert batch["inputs"].shape == batch["targets"].shape == (CFG.batch_size, CFG.seq_len)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["mask"].dtype == np.float32 and np.all(batch["mask"] == 1)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        seen.extend(window_of[row.astype(np.int32).tobytes()] for row in rows)
    first, second = seen[: it.num_windows], seen[it.num_windows : 2 * it.num_windows]
    assert sorted(first) == list(range(it.num_windows))  # every window once per epoch
    assert first != sorted(first) and first != second  # shuffled anew each epoch


def test_resume_is_exact(tokenizer, docs):
    it = data.train_iterator(CFG, tokenizer, docs)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 7)
    resumed = data.train_iterator(CFG, tokenizer, docs)
    take(resumed, 2)  # a different position, overwritten by set_state
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 7), expected)
    assert resumed.get_state() == it.get_state()


def test_same_seed_same_order_other_seed_differs(tokenizer, docs):
    first = take(data.train_iterator(CFG, tokenizer, docs), 3)
    assert_batches_equal(take(data.train_iterator(CFG, tokenizer, docs), 3), first)
    other = take(data.train_iterator(CFG, tokenizer, docs, seed=1), 3)
    assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])


def test_state_from_another_pipeline_is_rejected(tokenizer, docs):
    state = data.train_iterator(CFG, tokenizer, docs).get_state()
    other = data.train_iterator(CFG, tokenizer, docs[:-1])
    with pytest.raises(ValueError, match="tokens_crc32"):
        other.set_state(state)


def test_orbax_checkpoint_round_trip(tmp_path, tokenizer, docs):
    it = data.train_iterator(CFG, tokenizer, docs)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = take(it, 2)
    resumed = data.train_iterator(CFG, tokenizer, docs)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    assert_batches_equal(take(resumed, 2), expected)


def test_shards_union_is_global_batch(tokenizer, docs):
    global_batches = take(data.train_iterator(CFG, tokenizer, docs), 4)
    shards = [take(data.train_iterator(CFG, tokenizer, docs, i, 4), 4) for i in range(4)]
    for step, batch in enumerate(global_batches):
        for key in batch:
            joined = np.concatenate([shard[step][key] for shard in shards])
            np.testing.assert_array_equal(joined, batch[key])
    with pytest.raises(ValueError, match="shard_count dividing batch_size=8"):
        data.train_iterator(CFG, tokenizer, docs, 0, 3)
    with pytest.raises(ValueError, match="shard_index=4"):
        data.train_iterator(CFG, tokenizer, docs, 4, 4)


def test_corpus_shorter_than_a_window(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window"):
        data.train_iterator(CFG, tokenizer, ["tiny"])


def test_eval_batches(tokenizer, docs):
    batches = data.eval_batches(CFG, tokenizer, docs)
    assert len(batches) == CFG.eval_batches
    assert_batches_equal(data.eval_batches(CFG, tokenizer, docs), batches)
    uncapped = dataclasses.replace(CFG, eval_batches=1000)
    short = data.eval_batches(uncapped, tokenizer, docs[:1])
    num_windows = (len(data.tokenize_documents(tokenizer, docs[:1])) - 1) // CFG.seq_len
    assert num_windows % CFG.batch_size  # so the last batch is padded
    assert len(short) == num_windows // CFG.batch_size + 1
    assert short[-1]["mask"].shape == (CFG.batch_size, CFG.seq_len)
    assert short[-1]["mask"].sum() == (num_windows % CFG.batch_size) * CFG.seq_len
    assert np.all(short[-1]["inputs"][num_windows % CFG.batch_size :] == tokenizer.pad_id)
    halves = [data.eval_batches(CFG, tokenizer, docs, i, 2) for i in range(2)]
    joined = np.concatenate([halves[0][0]["inputs"], halves[1][0]["inputs"]])
    np.testing.assert_array_equal(joined, batches[0]["inputs"])
    assert data.eval_batches(CFG, tokenizer, []) == []


def test_build_tokenizer_load_checks_vocab(tmp_path, tokenizer, docs):
    tokenizer.save(tmp_path)
    saved = dataclasses.replace(CFG, tokenizer_path=tmp_path)
    assert saved.tokenizer_path == str(tmp_path)
    assert data.build_tokenizer(saved, docs, VOCAB) == tokenizer
    with pytest.raises(ValueError, match="set vocab_size=600"):
        data.build_tokenizer(saved, docs, 4096)
    assert isinstance(tokenizer, Tokenizer)


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([0, 1, 2, 3] * 5), 4) == pytest.approx(np.log(4))
    assert data.unigram_entropy(np.array([[7, 7], [7, 7]]), 8) == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        data.unigram_entropy(np.array([4]), 4)
    with pytest.raises(ValueError, match="one or more"):
        data.unigram_entropy(np.array([], np.int32), 4)
