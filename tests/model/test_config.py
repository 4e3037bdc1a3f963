"""Config validation, presets and command-line overrides."""

import dataclasses

import pytest

from configs import MODEL_PRESETS, get_model_config
from sparse_jax.model.config import ModelConfig, override


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (dict(ffn_keep_fraction=0.0), "ffn_keep_fraction"),
        (dict(ffn_keep_fraction=1.5), "ffn_keep_fraction"),
        (dict(ffn_predictor_dim=128), "ffn_predictor_dim"),
        (dict(ffn_predictor_dim=200), "ffn_predictor_dim"),
        (dict(attn_predictor_dim=32), "attn_predictor_dim"),
        (dict(attn_predictor_dim=0), "attn_predictor_dim"),
        (dict(model_dim=0), "model_dim"),
        (dict(ffn_kind="relu"), "ffn_kind"),
        (dict(layer_types=("local",)), "layer_types"),
        (dict(layer_types=("local", "global", "far", "local")), "layer_types"),
        (dict(attn_sparse_layers=(True,)), "attn_sparse_layers"),
        (dict(dtype="int8"), "dtype"),
        (dict(remat_policy="some"), "remat_policy"),
        (dict(topk_method="sort"), "topk_method"),
        (dict(attn_top_k=0), "attn_top_k"),
        (dict(final_logit_softcap=-1.0), "final_logit_softcap"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(ModelConfig(), **changes)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"preset='huge'.*tiny"):
        get_model_config("huge")


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = get_model_config(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_spark_2b_preset_matches_spec():
    cfg = get_model_config("spark_gemma2_2b")
    assert (cfg.model_dim, cfg.ffn_dim, cfg.ffn_predictor_dim) == (2304, 13824, 1024)
    assert cfg.ffn_keep_count == 1106
    assert (cfg.head_dim, cfg.attn_predictor_dim, cfg.attn_top_k) == (256, 128, 256)
    assert cfg.layer_types[:2] == ("local", "global")


def test_override_parses_types_and_rejects_unknown_fields():
    cfg = override(
        get_model_config("tiny"),
        ["num_layers=2", "ffn_keep_fraction=0.1", "scan_layers=false", "attn_sparse_layers=1,0"],
    )
    assert cfg.num_layers == 2 and cfg.ffn_keep_fraction == 0.1 and not cfg.scan_layers
    assert cfg.attn_sparse_layers == (True, False)
    with pytest.raises(ValueError, match="no field 'depth'"):
        override(cfg, ["depth=3"])
    with pytest.raises(ValueError, match="num_layers"):
        override(cfg, ["num_layers=two"])
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_dict({"bogus": 1})
