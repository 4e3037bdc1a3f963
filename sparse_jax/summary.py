"""Prints every preset's parameter count and FLOPs per token (dense-equivalent and sparse)."""

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


if __name__ == "__main__":
    main()
