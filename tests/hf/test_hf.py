"""Gemma-2 from and to Hugging Face, checked against transformers' own ``Gemma2ForCausalLM``.

The oracle is transformers: random tiny models are built and saved with it, imported, and the
library's logits and greedy tokens compared with the HF model's; exports are loaded back with
``from_pretrained``. The two configurations differ in every field the converter maps:
``query_pre_attn_scalar`` against ``head_dim``, soft-caps that bite or none, GQA groups of 2 and
6, the local/global pattern, and sequences longer than the window.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import stat

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import safetensors.numpy  # noqa: E402
from hf_models import (  # noqa: E402
    VOCAB,
    gemma_layout_tokenizer,
    hf_model,
    random_library_checkpoint,
    save_hf,
)

import sparse_jax  # noqa: E402
from sparse_jax.data.tokenizer import Tokenizer  # noqa: E402
from sparse_jax.decode.generate import generate  # noqa: E402
from sparse_jax.hf import (  # noqa: E402
    ConversionError,
    config_from_hf,
    config_to_hf,
    export_checkpoint,
    import_checkpoint,
)
from sparse_jax.hf.__main__ import main as cli  # noqa: E402
from sparse_jax.model.transformer import forward  # noqa: E402

CONFIGS = {
    # query_pre_attn_scalar 24 != head_dim 8, soft-caps of 4 and 3 (the logits of these weights
    # reach several times that), groups of 2, window 6 under 20-token inputs.
    "capped": dict(),
    # One kv head for six query heads, head_dim 16 = query_pre_attn_scalar, no attention cap,
    # global layer first, window 5.
    "wide_group": dict(
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=None,
        final_logit_softcapping=30.0,
        sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
}
SEQ = 20
# float32 forward of the same weights through two frameworks: summation order only.
LOGITS = dict(rtol=1e-4, atol=1e-4)


def tokens(batch: int = 2, length: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(loaded, ids: np.ndarray) -> np.ndarray:
    logits, _ = forward(loaded.config, loaded.params, jnp.asarray(ids))
    return np.asarray(logits)


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=LOGITS["rtol"], atol=LOGITS["atol"] * scale)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def imported(request, tmp_path_factory):
    """(HF model, its saved directory, the imported library model)."""
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(seed=1, **CONFIGS[request.param])
    hf_dir = save_hf(model, root / "hf")
    import_checkpoint(hf_dir, root / "run")
    return model, hf_dir, sparse_jax.load(root / "run")


def test_config_maps_field_by_field(imported):
    model, _, loaded = imported
    hf, cfg = model.config, loaded.config
    assert (cfg.ffn_kind, cfg.attn_kind) == ("gated", "dense")
    assert (cfg.vocab_size, cfg.model_dim, cfg.ffn_dim) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
    )
    assert cfg.query_scale == pytest.approx(hf.query_pre_attn_scalar**-0.5, rel=1e-15)
    assert cfg.attn_logit_softcap == hf.attn_logit_softcapping
    assert cfg.final_logit_softcap == hf.final_logit_softcapping
    assert cfg.sliding_window == hf.sliding_window
    names = {"sliding_attention": "local", "full_attention": "global"}
    assert list(cfg.layer_types) == [names[t] for t in hf.layer_types]
    assert cfg.rope_base == hf.rope_parameters["rope_theta"]
    assert cfg.max_seq_len == hf.max_position_embeddings


def test_logits_equal_hf(imported):
    model, _, loaded = imported
    ids = tokens()
    assert SEQ > loaded.config.sliding_window
    assert_logits_close(our_logits(loaded, ids), hf_logits(model, ids))


def test_soft_caps_bite():
    """The capped configuration is a real test of the caps: without them HF's logits move."""
    ids = tokens()
    capped = hf_logits(hf_model(seed=1), ids)
    uncapped = hf_logits(
        hf_model(seed=1, attn_logit_softcapping=None, final_logit_softcapping=None), ids
    )
    assert np.abs(uncapped).max() > 2 * np.abs(capped).max()
    assert not np.allclose(np.tanh(uncapped / 3.0) * 3.0, capped, atol=1e-2)


def test_greedy_generation_equals_hf(imported):
    model, _, loaded = imported
    prompts = tokens(batch=2, length=9, seed=3)
    new = 14  # the sequence outgrows the window
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(prompts), max_new_tokens=new, do_sample=False, min_new_tokens=new
        ).numpy()[:, prompts.shape[1] :]
    out = generate(loaded.config, loaded.params, prompts.tolist(), max_new_tokens=new)
    assert out.tokens == ref.tolist()


def test_export_reloads_in_transformers_and_round_trips(imported, tmp_path):
    model, hf_dir, loaded = imported
    out = export_checkpoint(loaded.path, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, *out.iterdir()):  # the usual permissions, not the temp dir's owner-only
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    ids = tokens(seed=5)
    np.testing.assert_array_equal(hf_logits(again, ids), hf_logits(model, ids))
    # HF -> library -> HF: every tensor bitwise equal.
    original = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    exported = safetensors.numpy.load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # library -> HF -> library: every parameter bitwise equal.
    import_checkpoint(out, tmp_path / "reimported")
    back = sparse_jax.load(tmp_path / "reimported")
    assert back.config == dataclasses.replace(loaded.config, name="exported")
    flat = dict(_leaves(loaded.params))
    for path, value in _leaves(back.params):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[path]), err_msg=path)
    assert back.tokenizer == loaded.tokenizer


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def test_sharded_import_equals_unsharded(tmp_path):
    model = hf_model(seed=2)
    whole = save_hf(model, tmp_path / "whole")
    sharded = save_hf(model, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    import_checkpoint(whole, tmp_path / "a")
    import_checkpoint(sharded, tmp_path / "b")
    a, b = sparse_jax.load(tmp_path / "a"), sparse_jax.load(tmp_path / "b")
    for (pa, va), (pb, vb) in zip(_leaves(a.params), _leaves(b.params), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def test_sharded_export_and_dtype(imported, tmp_path):
    model, _, loaded = imported
    out = export_checkpoint(loaded.path, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=8000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert again.dtype == torch.bfloat16
    ref = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(again.model.embed_tokens.weight, ref)
    import_checkpoint(out, tmp_path / "run")
    assert sparse_jax.load(tmp_path / "run").config.param_dtype == "bfloat16"


def test_import_in_another_dtype_casts(imported, tmp_path):
    _, hf_dir, loaded = imported
    import_checkpoint(hf_dir, tmp_path / "run", param_dtype="bfloat16")
    bf16 = sparse_jax.load(tmp_path / "run")
    assert bf16.config.param_dtype == "bfloat16"
    emb = np.asarray(bf16.params["embedder"]["embedding"])
    want = np.asarray(loaded.params["embedder"]["embedding"]).astype(emb.dtype)
    np.testing.assert_array_equal(emb, want)


def test_served_from_an_imported_checkpoint(imported):
    """What serve.py runs on: a prompt through the loader, tokenizer and generation."""
    _, _, loaded = imported
    prompt = loaded.tokenizer.encode("In the beginning", add_bos=True)
    assert prompt[0] == 2  # Gemma's bos
    out = generate(loaded.config, loaded.params, [prompt], max_new_tokens=4)
    assert len(out.tokens[0]) == 4
    assert isinstance(loaded.tokenizer.decode(out.tokens[0]), str)


# Errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return save_hf(hf_model(seed=4), tmp_path_factory.mktemp("errors") / "hf")


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(hf_dir: pathlib.Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    arrays = safetensors.numpy.load_file(path)
    edit(arrays)
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})


def _edit_config(hf_dir: pathlib.Path, **changes) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _one_line_error(hf_dir, workdir, match: str) -> None:
    with pytest.raises(ConversionError, match=match) as err:
        import_checkpoint(hf_dir, workdir)
    assert "\n" not in str(err.value)
    assert not (workdir / "checkpoints").exists()


def test_missing_tensor(small_hf, tmp_path):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    _edit_tensors(hf_dir, lambda a: a.pop("model.layers.1.mlp.up_proj.weight"))
    _one_line_error(hf_dir, tmp_path / "run", r"lacks tensor 'model.layers.1.mlp.up_proj.weight'")


def test_extra_tensor(small_hf, tmp_path):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    _edit_tensors(hf_dir, lambda a: a.update({"model.layers.3.mlp.up_proj.weight": np.ones(2)}))
    _one_line_error(hf_dir, tmp_path / "run", r"holds tensor 'model.layers.3.mlp.up_proj.weight'")


def test_shape_mismatch(small_hf, tmp_path):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(hf_dir, lambda a: a.update({name: a[name][:8]}))
    _one_line_error(hf_dir, tmp_path / "run", rf"tensor '{name}' .* has shape \(8, 32\), expected")


def test_untied_output_projection(small_hf, tmp_path):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    head = np.ones((VOCAB, 32), np.float32)
    _edit_tensors(hf_dir, lambda a: a.update({"lm_head.weight": head}))
    _one_line_error(hf_dir, tmp_path / "run", "untied output projection")


def test_tied_output_projection_is_accepted(small_hf, tmp_path):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    _edit_tensors(
        hf_dir, lambda a: a.update({"lm_head.weight": a["model.embed_tokens.weight"].copy()})
    )
    import_checkpoint(hf_dir, tmp_path / "run")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "unsupported architecture"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
        (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters"),
        (dict(attention_bias=True), "attention_bias=True"),
        (dict(some_new_field=1), r"field\(s\) \['some_new_field'\]"),
        (dict(num_key_value_heads=3), "num_kv_heads"),
    ],
)
def test_unrepresentable_config(small_hf, tmp_path, changes, match):
    hf_dir = _copy(small_hf, tmp_path / "hf")
    _edit_config(hf_dir, **changes)
    _one_line_error(hf_dir, tmp_path / "run", match)


def test_transformers_4_config_fields():
    """A config as transformers 4 writes it (rope_theta, no layer_types, torch_dtype)."""
    cfg = config_from_hf(
        {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": 256000,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "cache_implementation": "hybrid",
            "torch_dtype": "bfloat16",
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "attention_dropout": 0.0,
            "attention_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "transformers_version": "4.42.4",
        }
    )
    from configs import get_model_config

    preset = get_model_config("gemma2_2b")
    for field in (
        "vocab_size",
        "model_dim",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "ffn_dim",
        "layer_types",
        "sliding_window",
        "max_seq_len",
        "attn_logit_softcap",
        "final_logit_softcap",
        "rope_base",
        "norm_eps",
    ):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert cfg.resolved_query_scale == pytest.approx(preset.resolved_query_scale, rel=1e-15)
    assert cfg.param_dtype == "bfloat16"


# Gemma-2 9B and 27B as their config.json files give them (transformers 4 layout).
LARGER = {
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
               num_attention_heads=16, num_key_value_heads=8, head_dim=256,
               query_pre_attn_scalar=256),
    "27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                query_pre_attn_scalar=144),
}  # fmt: skip


@pytest.mark.parametrize("size", sorted(LARGER))
def test_larger_gemma2_configs(size):
    """27B's query scale is 1/sqrt(144), not 1/sqrt(head_dim=128): the field decides."""
    hf = dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, torch_dtype="float32",
        **LARGER[size],
    )  # fmt: skip
    cfg = config_from_hf(hf)
    assert cfg.resolved_query_scale == pytest.approx(hf["query_pre_attn_scalar"] ** -0.5)
    assert cfg.num_layers == hf["num_hidden_layers"] == len(cfg.layer_types)
    assert cfg.layer_types[:2] == ("local", "global")
    back = config_to_hf(cfg)
    for key in LARGER[size]:
        assert back[key] == hf[key], key
    assert back["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert back["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_overrides(small_hf, tmp_path):
    import_checkpoint(small_hf, tmp_path / "a", overrides=["max_seq_len=32", "name=mine"])
    cfg = sparse_jax.load(tmp_path / "a").config
    assert (cfg.max_seq_len, cfg.name) == (32, "mine")
    for item, match in [
        ("ffn_kind=spark", "research question"),
        ("attn_kind=spark", "research question"),
        ("sliding_window=3", "fixed by the checkpoint's config.json"),
        ("max_seq_len=0", "max_seq_len"),
    ]:
        with pytest.raises(ConversionError, match=match):
            import_checkpoint(small_hf, tmp_path / "b", overrides=[item])
        assert not (tmp_path / "b" / "checkpoints").exists()


def test_directory_problems(small_hf, tmp_path):
    with pytest.raises(ConversionError, match="is not a directory"):
        import_checkpoint(tmp_path / "nowhere", tmp_path / "run")
    no_tok = _copy(small_hf, tmp_path / "no_tok")
    (no_tok / "tokenizer.model").unlink()
    _one_line_error(no_tok, tmp_path / "run", "no tokenizer model")
    two = _copy(small_hf, tmp_path / "two")
    shutil.copy(two / "model.safetensors", two / "other.safetensors")
    _one_line_error(two, tmp_path / "run", "2 safetensors files and no model.safetensors.index")
    broken = _copy(small_hf, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _one_line_error(broken, tmp_path / "run", "not a readable safetensors file")


def test_never_overwrites(small_hf, tmp_path):
    import_checkpoint(small_hf, tmp_path / "run")
    with pytest.raises(ConversionError, match="already holds checkpoints"):
        import_checkpoint(small_hf, tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an empty directory"):
        export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_spark_checkpoint_does_not_export(tmp_path):
    spark = random_library_checkpoint(tmp_path / "spark")
    with pytest.raises(ConversionError, match=r"Spark model .* no architecture"):
        export_checkpoint(spark, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_checkpoint_is_not_resumed_by_training(small_hf, tmp_path):
    from sparse_jax.data.pipeline import DataConfig
    from sparse_jax.train.checkpoint import CheckpointError
    from sparse_jax.train.config import TrainConfig
    from sparse_jax.train.loop import train

    import_checkpoint(small_hf, tmp_path / "run")
    loaded = sparse_jax.load(tmp_path / "run")
    tc = TrainConfig(steps=1, data=DataConfig(seq_len=16, batch_size=2))
    with pytest.raises(CheckpointError, match="parameters only"):
        train(loaded.config, tc, tmp_path / "run", verbose=False)
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()


def test_in_place_saves_are_synchronous(tmp_path):
    from sparse_jax.train.checkpoint import Checkpointer

    with pytest.raises(ValueError, match="async_save=False"):
        Checkpointer(tmp_path / "c", numpy_in_place=True)


def test_cli(small_hf, tmp_path, capsys):
    assert cli(["import", str(small_hf), str(tmp_path / "run")]) == 0
    assert "peak resident memory" in capsys.readouterr().out
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert cli(["import", str(small_hf), str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_gemma_layout_tokenizer():
    tok = Tokenizer(gemma_layout_tokenizer())
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.turn_ids == (4, 5)
    ids = tok.encode("And God said", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1
    assert tok.decode(ids) == "And God said"
