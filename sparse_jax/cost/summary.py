"""Prints every preset's parameter count and FLOPs per token (dense-equivalent and sparse),
then the 2B pair's per-token FLOPs by context (the README's cost table)."""

from __future__ import annotations

from configs import MODEL_PRESETS, get_model_config
from sparse_jax.cost import flops


def main() -> None:
    print(f"{'preset':<18}{'params':>16}{'GFLOP/tok dense':>18}{'GFLOP/tok sparse':>18}")
    for name in MODEL_PRESETS:
        cfg = get_model_config(name)
        ctx = cfg.max_seq_len
        dense = flops.decode_flops(cfg, ctx, sparse=False).total / 1e9
        sparse = flops.decode_flops(cfg, ctx, sparse=True).total / 1e9
        print(f"{name:<18}{flops.param_count(cfg):>16,}{dense:>18.4f}{sparse:>18.4f}")
    dense_cfg, spark_cfg = get_model_config("gemma2_2b"), get_model_config("spark_gemma2_2b")
    header = ("context", "dense GFLOP", "Spark GFLOP", "ratio", "w/o unembed", "FFN", "attn core")
    print("\n" + "".join(f"{h:>13}" for h in header))
    for context in (128, 2048, 8192):
        dense = flops.decode_flops(dense_cfg, context, sparse=False)
        sparse = flops.decode_flops(spark_cfg, context, sparse=True)
        ratio = flops.flops_ratio(dense_cfg, spark_cfg, context)
        cells = (
            f"{context:>13}{dense.total / 1e9:>13.3f}{sparse.total / 1e9:>13.3f}",
            f"{ratio['with_unembed']:>12.2f}x{ratio['without_unembed']:>12.2f}x",
            f"{dense.ffn / sparse.ffn:>12.2f}x{dense.attn_core / sparse.attn_core:>12.2f}x",
        )
        print("".join(cells))


if __name__ == "__main__":
    main()
