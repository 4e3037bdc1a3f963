"""Prepared data: the shards equal the in-memory path's streams, batches and split; prepare
resumes and never overwrites; damaged directories and foreign tokenizers are clear errors;
training from shards equals training from text and resumes exactly."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from micro_configs import MICRO_MODEL, MICRO_TRAIN

from configs import get_model_config
from sparse_jax.data import corpus, pipeline
from sparse_jax.data import prepare as prep
from sparse_jax.data.prepared import PreparedData, PreparedDataError, is_prepared
from sparse_jax.model.config import override
from sparse_jax.serve.loading import load
from sparse_jax.train.config import TrainConfig
from sparse_jax.train.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 512
DOCS = 400  # of the bundled corpus: enough for several shards, quick to tokenize
CFG = pipeline.DataConfig(seq_len=32, batch_size=4, eval_batches=3)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """The first chapters of the bundled corpus as a .jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    docs = corpus.kjv_documents()[:DOCS]
    (root / "kjv.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def settings(corpus_dir, **kw) -> prep.Settings:
    base = dict(inputs=(str(corpus_dir),), vocab_size=VOCAB, shard_tokens=20_000)
    return prep.Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    prep.prepare(settings(corpus_dir), out, workers=0)
    return out


@pytest.fixture(scope="module")
def in_memory(corpus_dir):
    """The in-memory path's split, tokenizer and streams for the same corpus and seed."""
    cfg = pipeline.DataConfig(paths=(str(corpus_dir),))
    docs = pipeline.load_documents(cfg)
    train_docs, eval_docs = corpus.split_documents(docs, cfg.eval_fraction, 0)
    tokenizer = pipeline.build_tokenizer(cfg, train_docs, VOCAB, 0)
    return tokenizer, train_docs, eval_docs


def _stream(data: PreparedData, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in data.streams[split].arrays])


def test_shards_equal_the_in_memory_streams(prepared, in_memory):
    tokenizer, train_docs, eval_docs = in_memory
    data = PreparedData(prepared)
    assert data.tokenizer == tokenizer
    assert len(data.manifest["shards"]["train"]) >= 3
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(
        _stream(data, "train"), pipeline.tokenize_documents(tokenizer, train_docs)
    )
    np.testing.assert_array_equal(
        _stream(data, "eval"), pipeline.tokenize_documents(tokenizer, eval_docs)
    )
    assert data.manifest["documents"] == {"train": len(train_docs), "eval": len(eval_docs)}
    want = pipeline.unigram_entropy(
        pipeline.tokenize_documents(tokenizer, train_docs), tokenizer.vocab_size
    )
    assert data.unigram_entropy() == pytest.approx(want, rel=1e-12)
    data.verify()


def _same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_equal_the_in_memory_iterator(prepared, in_memory):
    tokenizer, train_docs, eval_docs = in_memory
    data = PreparedData(prepared)
    ours = data.train_iterator(CFG, seed=5)
    theirs = pipeline.train_iterator(CFG, tokenizer, train_docs, seed=5)
    offsets = data.streams["train"].offsets[1:-1]
    crossed = 0
    for _ in range(ours.num_windows // CFG.batch_size + 3):  # into the second epoch
        _same_batches(next(ours), next(theirs))
    # Windows that straddle two shards were among them.
    starts = np.arange(ours.num_windows) * CFG.seq_len
    crossed = sum(np.any((starts < o) & (starts + CFG.seq_len + 1 > o)) for o in offsets)
    assert crossed == len(offsets)
    for a, b in zip(
        data.eval_batches(CFG), pipeline.eval_batches(CFG, tokenizer, eval_docs), strict=True
    ):
        _same_batches(a, b)


def test_two_processes_read_disjoint_rows_of_the_global_batch(prepared):
    data = PreparedData(prepared)
    whole = data.train_iterator(CFG, seed=1)
    halves = [data.train_iterator(CFG, shard_index=i, shard_count=2, seed=1) for i in (0, 1)]
    for _ in range(5):
        full = next(whole)
        parts = [next(h) for h in halves]
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_iterator_state_resumes_and_is_checked(prepared, corpus_dir, tmp_path):
    data = PreparedData(prepared)
    it = data.train_iterator(CFG, seed=2)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = next(it)
    again = data.train_iterator(CFG, seed=2)
    again.set_state(state)
    _same_batches(next(again), want)
    other = tmp_path / "other"
    prep.prepare(settings(corpus_dir, seed=1), other, workers=0)
    with pytest.raises(ValueError, match="prepared_sha256"):
        PreparedData(other).train_iterator(CFG, seed=2).set_state(state)


def test_interrupted_prepare_resumes_to_the_same_shards(corpus_dir, prepared, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(prep._Interrupted):
        prep.prepare(settings(corpus_dir), out, workers=0, _stop_after_shards=2)
    assert not (out / prep.MANIFEST).exists() and (out / prep.PROGRESS).exists()
    np.save(out / "train-00999.npy", np.zeros(3, np.uint16))  # written, never recorded
    with pytest.raises(PreparedDataError, match="unfinished prepare"):
        PreparedData(out)
    with pytest.raises(prep.PrepareError, match="other settings"):
        prep.prepare(settings(corpus_dir, seed=9), out, workers=0)
    prep.prepare(settings(corpus_dir), out, workers=0)
    assert not (out / "train-00999.npy").exists()
    done, reference = (json.loads((d / prep.MANIFEST).read_text()) for d in (out, prepared))
    assert done["shards"] == reference["shards"]
    assert done["tokenizer"] == reference["tokenizer"]


def test_a_finished_prepare_is_never_overwritten(corpus_dir, prepared, tmp_path):
    before = (prepared / prep.MANIFEST).read_bytes()
    with pytest.raises(prep.PrepareError, match="never overwritten"):
        prep.prepare(settings(corpus_dir), prepared, workers=0)
    assert (prepared / prep.MANIFEST).read_bytes() == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(prep.PrepareError, match="not empty"):
        prep.prepare(settings(corpus_dir), tmp_path / "busy", workers=0)


def test_cli_with_worker_processes_and_other_formats(corpus_dir, prepared, tmp_path):
    """Two worker processes; the same documents as .jsonl.gz and .parquet give the same
    tokens as the .jsonl (the inputs' identity differs, the shards do not)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    docs = corpus.kjv_documents()[:DOCS]
    other = tmp_path / "inputs"
    other.mkdir()
    half = DOCS // 2
    with gzip.open(other / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:half])
    pq.write_table(pa.table({"text": docs[half:]}), other / "b.parquet")
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "sparse_jax.data.prepare", "--input", str(other)]
    cmd += ["--out", str(out), "--vocab-size", str(VOCAB), "--shard-tokens", "20000"]
    cmd += ["--workers", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "training and" in done.stdout
    ours, reference = PreparedData(out), PreparedData(prepared)
    for split in prep.SPLITS:
        np.testing.assert_array_equal(_stream(ours, split), _stream(reference, split))
    verify = subprocess.run(
        [sys.executable, "-m", "sparse_jax.data.prepare", "--verify", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and "matches its checksum" in verify.stdout


def _damaged(prepared, tmp_path) -> pathlib.Path:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    return copy


def test_damaged_directories_are_clear_errors(prepared, tmp_path):
    copy = _damaged(prepared, tmp_path)
    (copy / "train-00001.npy").unlink()
    with pytest.raises(PreparedDataError, match=r"shard train-00001\.npy .* is missing"):
        PreparedData(copy)
    copy = _damaged(prepared, tmp_path / "b")
    data = (copy / "train-00001.npy").read_bytes()
    (copy / "train-00001.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreparedDataError, match=r"train-00001\.npy"):
        PreparedData(copy)
    copy = _damaged(prepared, tmp_path / "c")
    data = bytearray((copy / "eval-00000.npy").read_bytes())
    data[-1] ^= 0xFF  # same length, one token changed: only the checksum sees it
    (copy / "eval-00000.npy").write_bytes(bytes(data))
    PreparedData(copy)
    with pytest.raises(PreparedDataError, match=r"eval-00000\.npy does not match its checksum"):
        PreparedData(copy).verify()
    copy = _damaged(prepared, tmp_path / "d")
    (copy / "tokenizer.model").write_bytes((copy / "tokenizer.model").read_bytes()[:-1] + b"x")
    with pytest.raises(PreparedDataError, match="checksum"):
        PreparedData(copy)
    copy = _damaged(prepared, tmp_path / "e")
    (copy / prep.MANIFEST).write_text("{")
    with pytest.raises(PreparedDataError, match="unreadable"):
        PreparedData(copy)
    assert is_prepared((str(prepared),)) and not is_prepared((str(tmp_path),))


# Training ------------------------------------------------------------------------------------

MODEL = override(get_model_config("tiny"), MICRO_MODEL)
STEPS = 6


def _train_config(paths, steps=STEPS) -> TrainConfig:
    items = [t for t in MICRO_TRAIN if not t.startswith(("steps", "checkpoint_every"))]
    tc = override(TrainConfig(), [*items, f"steps={steps}", "checkpoint_every=2"])
    return override(tc, [f"data.paths={','.join(paths)}"])


def _params_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def trained_from_shards(prepared, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("from_shards")
    train(MODEL, _train_config([str(prepared)]), workdir, verbose=False)
    return workdir


@pytest.mark.slow  # the default run checks the streams and batches it rests on
def test_training_from_shards_equals_training_from_text(trained_from_shards, corpus_dir, tmp_path):
    train(MODEL, _train_config([str(corpus_dir)]), tmp_path, verbose=False)
    _params_equal(load(trained_from_shards).params, load(tmp_path).params)


@pytest.mark.slow  # the iterator-state test above covers the data side in the default run
def test_interrupted_training_from_shards_resumes_exactly(trained_from_shards, prepared, tmp_path):
    tc = _train_config([str(prepared)])
    train(MODEL, tc, tmp_path, stop_after=3, verbose=False)
    train(MODEL, tc, tmp_path, verbose=False)
    _params_equal(load(trained_from_shards).params, load(tmp_path).params)


def test_a_checkpoint_of_another_tokenizer_is_refused(prepared, corpus_dir, tmp_path):
    workdir = tmp_path / "run"
    train(MODEL, _train_config([str(prepared)], steps=2), workdir, verbose=False)
    other = tmp_path / "other"
    prep.prepare(settings(corpus_dir, seed=1), other, workers=0)
    tc = _train_config([str(other)], steps=4)
    with pytest.raises(PreparedDataError, match=r"tokenizer of checkpoint step 2 .* not the one"):
        train(MODEL, tc, workdir, verbose=False)


@pytest.mark.slow
def test_kill_9_while_training_from_shards_then_rerun_is_bitwise_identical(prepared, tmp_path):
    """train.py on a prepared directory, killed with SIGKILL mid-run and rerun, ends with the
    parameters of an uninterrupted run."""
    import time

    def run(workdir):
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny"]
        cmd += ["--workdir", str(workdir), "--set", *MICRO_MODEL, *MICRO_TRAIN]
        cmd += [f"data.paths={prepared}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    reference = run(tmp_path / "reference")
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out.decode()
    proc = run(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and '"step": 7' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rerun = run(tmp_path / "killed")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out.decode()
    _params_equal(load(tmp_path / "reference").params, load(tmp_path / "killed").params)
