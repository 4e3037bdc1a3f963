"""Public entry point of blockwise attention: validation, padding, dispatch.

``"xla"`` runs the scan of :mod:`pallas_kernels.blockwise_attention.xla`; ``"native"`` runs
Spark attention as the C++ kernels of :mod:`pallas_kernels.blockwise_attention.native`, which
read only the kept keys' other half and values (dense attention, and key parts of another
dtype than float32 or bfloat16, run the XLA scan); ``"pallas_tpu"`` and ``"pallas_gpu"`` run
the kernels of :mod:`pallas_kernels.blockwise_attention.pallas`. All of them are
differentiable without storing a [T, S] tensor, and all are held to the materialized
reference (:mod:`pallas_kernels.blockwise_attention.reference`) by the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch
from pallas_kernels.blockwise_attention import native, pallas, xla

# Block size rules per Pallas backend: (query multiple, key multiple, powers of two only).
# TPU: a query tile [bq, W] needs bq % 8 == 0 (16 for 16-bit inputs, which Mosaic packs two
# rows to a sublane) and a key-position tile [1, bk] bk % 128 == 0 (Mosaic's (8, 128)
# tiling); GPU: Triton tensors have power-of-two sizes, >= 16 for dots.
_RULES = {"pallas_tpu": (8, 128, False), "pallas_gpu": (16, 16, True)}
# Default (block_q, block_k): 256 x 128 measured fastest for the XLA scan on CPU (see
# ``ModelConfig.attn_key_block_size``); on GPU 128 x 128, the blocks of Pallas' own GPU flash
# attention, since the Triton kernel holds its tiles in registers.
_DEFAULT_BLOCKS = {"pallas_gpu": (128, 128)}
_DEFAULT = (256, 128)


def _rules(implementation: str, narrow: bool) -> tuple[int, int, bool] | None:
    """The block rules of ``implementation`` (None: any size), ``narrow`` for 16-bit inputs."""
    rules = _RULES.get(implementation)
    if rules is not None and implementation == "pallas_tpu" and narrow:
        rules = (16, *rules[1:])
    return rules


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, unit: int, power_of_two: bool) -> int:
    if power_of_two:
        return max(unit, 1 << (n - 1).bit_length())
    return -(-n // unit) * unit


def _check_block(name: str, value, implementation: str, narrow: bool) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    rules = _rules(implementation, narrow)
    if rules is None:
        return
    q_unit, k_unit, power_of_two = rules
    unit = q_unit if name == "block_q" else k_unit
    if value % unit or (power_of_two and value & (value - 1)):
        kind = "a power of two >= " if power_of_two else "a multiple of "
        raise ValueError(
            f"{name}={value} must be {kind}{unit} for implementation={implementation!r}"
        )


def _block(requested: int, length: int, implementation: str, axis: str, narrow: bool) -> int:
    """The block used for ``length`` rows: the requested one, or less for a short input."""
    rules = _rules(implementation, narrow)
    if rules is None:
        return min(requested, length)
    q_unit, k_unit, power_of_two = rules
    return min(requested, _round_up(length, q_unit if axis == "q" else k_unit, power_of_two))


def blockwise_attention(
    q: tuple[jax.Array, ...],
    keys: tuple[jax.Array, ...],
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: jax.Array | int,
    *,
    enabled: jax.Array | bool = True,
    softcap: float | None = None,
    top_k: int = 0,
    block_q: int | None = None,
    block_k: int | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of grouped queries over keys, blockwise, in O(T x block) memory.

    Dense (Gemma-2): softmax over the soft-capped scores of valid keys. Spark: the keys at or
    above each query's statistical threshold over its valid keys' capped predictor scores
    (every valid key when there are at most ``top_k``, or when ``enabled`` is false), softmax
    over those, each value weighted by ``softplus`` of its gate score.

    Args:
      q: dense: ``(q * scale,)``; Spark: ``(q_pred * pred_scale, q_rest * gate_scale)``, each
        [B, K, G, T, W].
      keys: dense: ``(k,)`` [B, K, S, H]; Spark: ``(k_pred, k_rest)``.
      v: [B, K, S, H].
      q_pos: [B, T] query positions (-1: padding, output 0).
      k_pos: [B, S] key positions (-1: empty).
      window: keys at distance >= window are out of reach.
      enabled: Spark only: false keeps every valid key.
      softcap: the logit soft-cap (None: none).
      top_k: Spark's k; 0 means dense attention.
      block_q: query rows per block (T is padded up to a multiple). Pallas TPU: a multiple
        of 8 (16 when an input is 16-bit); Pallas GPU: a power of two >= 16. None: 256
        (128 on GPU).
      block_k: keys per block (S is padded up to a multiple). Pallas TPU: a multiple of 128;
        Pallas GPU: a power of two >= 16. None: 128.
      implementation: ``"auto"``, ``"xla"``, ``"native"`` (Spark: the C++ kernels, which take
        no blocks; dense: ``"xla"``), ``"pallas_tpu"`` or ``"pallas_gpu"``.
      interpret: run the requested Pallas implementation in Pallas interpret mode.

    Returns:
      out [B, K, G, T, H] float32 and the attended keys per query [B, K, G, T] float32.

    Raises:
      ValueError: bad block sizes or inconsistent parts.
      dispatch.ImplementationUnavailableError: a Pallas implementation that cannot run here.
    """
    name = dispatch.resolve_implementation(implementation, interpret)
    default_q, default_k = _DEFAULT_BLOCKS.get(name, _DEFAULT)
    block_q = default_q if block_q is None else block_q
    block_k = default_k if block_k is None else block_k
    narrow = min(jnp.dtype(x.dtype).itemsize for x in (*q, *keys, v)) < 4
    for arg, value in (("block_q", block_q), ("block_k", block_k)):
        _check_block(arg, value, name, narrow)
    if len(q) != (2 if top_k else 1) or len(keys) != len(q):
        raise ValueError("dense attention takes one query and key part, Spark two")
    if q[0].ndim != 5 or v.ndim != 4 or q[0].shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q parts must be [B, K, G, T, W] and v [B, K, S, H] with the same B, K; got "
            f"{q[0].shape} and {v.shape}"
        )
    if name == "native" and top_k and native.supports(keys, v):
        return native.attention(
            tuple(q),
            tuple(keys),
            v,
            q_pos.astype(jnp.int32),
            k_pos.astype(jnp.int32),
            jnp.asarray(window, jnp.int32),
            jnp.asarray(enabled, bool),
            int(top_k),
            None if softcap is None else float(softcap),
        )
    t, s = q[0].shape[3], v.shape[2]
    bq, bk = _block(block_q, t, name, "q", narrow), _block(block_k, s, name, "k", narrow)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    q = tuple(_pad(x, 3, tp) for x in q)
    keys = tuple(_pad(x, 2, sp) for x in keys)
    v = _pad(v, 2, sp)
    q_pos = _pad(q_pos.astype(jnp.int32), 1, tp, -1)
    k_pos = _pad(k_pos.astype(jnp.int32), 1, sp, -1)
    window = jnp.asarray(window, jnp.int32)
    enabled = jnp.asarray(enabled, bool)
    softcap = None if softcap is None else float(softcap)
    if name in ("xla", "native"):
        out, n = xla.attention(
            q, keys, v, q_pos, k_pos, window, enabled, xla.Blocks(bq, bk, softcap, int(top_k))
        )
    else:
        settings = pallas.Settings(name, bq, bk, softcap, int(top_k), interpret)
        out, n = pallas.attention(q, keys, v, q_pos, k_pos, window, enabled, settings)
    return out[..., :t, :], n[..., :t]
