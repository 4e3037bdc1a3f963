"""The HF transformers peer of ``benchmarks/decode_peers.py`` is the ``gemma2_2b`` preset.

Skipped unless torch and transformers (the ``dev`` extra) are installed. Only the config
is built at full size; the one model instantiated is tiny.
"""

import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import decode_peers  # noqa: E402
from configs import get_model_config  # noqa: E402
from sparse_jax.model.config import ModelConfig  # noqa: E402

PRESET = get_model_config("gemma2_2b")


def test_hf_config_matches_gemma2_2b_field_by_field():
    hf = decode_peers.hf_config(PRESET)
    assert hf.vocab_size == PRESET.vocab_size == 256_000
    assert hf.hidden_size == PRESET.model_dim
    assert hf.intermediate_size == PRESET.ffn_dim
    assert hf.num_hidden_layers == PRESET.num_layers
    assert hf.num_attention_heads == PRESET.num_heads
    assert hf.num_key_value_heads == PRESET.num_kv_heads
    assert hf.head_dim == PRESET.head_dim
    assert hf.sliding_window == PRESET.sliding_window
    assert hf.max_position_embeddings == PRESET.max_seq_len
    names = {"local": "sliding_attention", "global": "full_attention"}
    assert list(hf.layer_types) == [names[t] for t in PRESET.layer_types]
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert hf.query_pre_attn_scalar**-0.5 == pytest.approx(PRESET.resolved_query_scale, rel=1e-12)
    assert hf.attn_logit_softcapping == PRESET.attn_logit_softcap
    assert hf.final_logit_softcapping == PRESET.final_logit_softcap
    assert hf.rms_norm_eps == PRESET.norm_eps
    assert hf.rope_parameters["rope_theta"] == PRESET.rope_base
    assert hf.rope_parameters["rope_type"] == "default"
    assert hf.hidden_activation == "gelu_pytorch_tanh"
    assert hf.tie_word_embeddings
    assert not hf.attention_bias


def test_layer_slice_keeps_widths_and_alternation():
    cfg = decode_peers.sliced(PRESET, 3, 8192 + 9)
    hf = decode_peers.hf_config(cfg)
    assert hf.num_hidden_layers == 3
    assert hf.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (256_000, 2304, 9216)
    with pytest.raises(ValueError, match="--layers"):
        decode_peers.sliced(PRESET, 27, 128)


def test_spark_preset_has_no_hf_peer():
    with pytest.raises(ValueError, match="dense Gemma-2"):
        decode_peers.hf_config(get_model_config("spark_gemma2_2b"))


def test_tiny_peer_decodes_over_a_sliding_window_cache():
    cfg = ModelConfig(
        vocab_size=64,
        model_dim=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        ffn_dim=48,
        ffn_kind="gated",
        attn_kind="dense",
        sliding_window=8,
        max_seq_len=64,
    )
    model = decode_peers.build_hf_model(cfg, "float32")
    assert model.dtype == torch.float32
    with torch.inference_mode():
        cache = decode_peers.hf_cache(model, 20)
    assert cache.get_seq_length() == 20
    assert cache.layers[0].keys.shape[-2] == cfg.sliding_window - 1  # local layer
    assert cache.layers[1].keys.shape[-2] == 20  # global layer
    ms = decode_peers.hf_decode_ms(model, 20, steps=2, warmup=1)
    assert ms > 0


def test_summary_compares_fastest_dtypes_to_the_bound():
    report = {
        "contexts": [128],
        "hf": {"float32": {"decode_b1_p128": 600.0}, "bfloat16": {"decode_b1_p128": 400.0}},
        "jax": {
            "float32": {"spark_gemma2_2b": {"decode_b1_p128": 200.0}},
            "bfloat16": {"spark_gemma2_2b": {"decode_b1_p128": 250.0}},
        },
        "bounds": {
            "float32": {"128": {"bound_ratio": 1.8}},
            "bfloat16": {"128": {"bound_ratio": 2.5}},
        },
    }
    (s,) = decode_peers.summarize(report)
    assert (s["hf_dtype"], s["spark_dtype"]) == ("bfloat16", "float32")
    assert s["hf_over_spark"] == pytest.approx(2.0)
    assert s["target"] == pytest.approx(0.9 * 1.8)
    assert s["met"]
    report["hf"]["bfloat16"]["decode_b1_p128"] = 300.0
    assert not decode_peers.summarize(report)[0]["met"]


def test_cli_rejects_bad_options():
    with pytest.raises(SystemExit):
        decode_peers.parse_args(["--dtypes", "float16"])
    args = decode_peers.parse_args(["--layers", "1", "--contexts", "128,256"])
    assert args.contexts == [128, 256] and args.layers == 1
