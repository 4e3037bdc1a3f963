"""Prints every preset's parameter count and FLOPs per token (dense-equivalent and sparse),
then the 2B pair's per-token FLOPs by context (the README's cost table)."""

from __future__ import annotations

from configs import MODEL_PRESETS, get_model_config
from sparse_jax import flops


def main() -> None:
    print(f"{'preset':<18}{'params':>16}{'GFLOP/tok dense':>18}{'GFLOP/tok sparse':>18}")
    for name in MODEL_PRESETS:
        cfg = get_model_config(name)
        ctx = cfg.max_seq_len
        dense = flops.decode_flops(cfg, ctx, sparse=False).total / 1e9
        sparse = flops.decode_flops(cfg, ctx, sparse=True).total / 1e9
        print(f"{name:<18}{flops.param_count(cfg):>16,}{dense:>18.4f}{sparse:>18.4f}")
    dense_cfg, spark_cfg = get_model_config("gemma2_2b"), get_model_config("spark_gemma2_2b")
    print(f"\n{'context':>8}{'dense GFLOP':>13}{'Spark GFLOP':>13}{'ratio':>8}{'w/o unembed':>13}")
    for context in (128, 2048, 8192):
        dense = flops.decode_flops(dense_cfg, context, sparse=False).total / 1e9
        sparse = flops.decode_flops(spark_cfg, context, sparse=True).total / 1e9
        ratio = flops.flops_ratio(dense_cfg, spark_cfg, context)
        print(
            f"{context:>8}{dense:>13.3f}{sparse:>13.3f}{ratio['with_unembed']:>7.2f}x"
            f"{ratio['without_unembed']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
