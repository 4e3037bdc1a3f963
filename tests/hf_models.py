"""Tiny random Gemma-2 models built with transformers, and a tokenizer in Gemma's id layout."""

from __future__ import annotations

import functools
import io
import pathlib

import sentencepiece as spm

from sparse_jax.data.pipeline import DataConfig, load_documents
from sparse_jax.data.tokenizer import TURN_PIECES

VOCAB = 320


@functools.cache
def gemma_layout_tokenizer(vocab_size: int = VOCAB) -> bytes:
    """A byte-fallback BPE model with Gemma's special ids: pad 0, eos 1, bos 2, unk 3, and the
    turn markers as user-defined pieces, trained on the bundled corpus."""
    docs = load_documents(DataConfig())[:300]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for d in docs for line in d.splitlines() if line.strip()),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(TURN_PIECES),
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return writer.getvalue()


def hf_model(seed: int = 0, std: float = 0.2, **config):
    """A random ``Gemma2ForCausalLM`` in float32 with eager attention (HF applies the logit
    soft-cap there), its weights drawn with ``std`` so that the soft-caps bite."""
    import torch
    import transformers

    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=6,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0,
    )
    base.update(config)
    hf_config = transformers.Gemma2Config(**base)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if name.endswith("norm.weight") else std
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_hf(model, directory: pathlib.Path, **kwargs) -> pathlib.Path:
    """``save_pretrained`` plus the tokenizer, as a Hugging Face model directory holds them."""
    model.save_pretrained(directory, **kwargs)
    (directory / "tokenizer.model").write_bytes(gemma_layout_tokenizer(model.config.vocab_size))
    return directory


@functools.cache
def _library_tokenizer_bytes() -> bytes:
    from sparse_jax.data.tokenizer import Tokenizer

    return Tokenizer.train(load_documents(DataConfig())[:200], 512).model_proto


def random_library_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """A step-0 checkpoint of the micro Spark model with random weights and a tokenizer trained
    here (the library's layout, no turn markers): a Spark checkpoint without training one."""
    import jax
    from micro_configs import MICRO_MODEL

    from configs import get_model_config
    from sparse_jax.data.tokenizer import Tokenizer
    from sparse_jax.model.config import override
    from sparse_jax.model.transformer import init_params
    from sparse_jax.train.checkpoint import Checkpointer, tokenizer_to_json

    cfg = override(get_model_config("tiny"), MICRO_MODEL)
    params = init_params(cfg, jax.random.key(0))
    tokenizer = Tokenizer(_library_tokenizer_bytes())
    meta = {"model_config": cfg.to_dict(), "tokenizer": tokenizer_to_json(tokenizer)}
    with Checkpointer(workdir / "checkpoints", keep=1, async_save=False) as ckpt:
        ckpt.save(0, {"params": params}, {}, meta)
    return workdir
