"""How the model computes on each backend: product formulation and cost constants.

The model's code says what to compute; this module says how, per JAX backend, so that a
trick measured on one backend never runs on another by default:

* ``elementwise_max_rows``: from 2 to this many rows (and a single row of a narrow weight) a
  product is an elementwise multiply-and-sum behind a fusion fence instead of a dot. On the
  project's 2-core CPUs XLA's dot streamed 7-9 GB/s at 2-8 float32 rows against 16-19 GB/s
  for the elementwise form, and a bfloat16 dot was many times slower than the fused upcast.
  On TPU and GPU a dot runs on the matrix units: 0 turns the formulation off.
* ``gather_cost``: cost of one gathered row against one streamed row, which decides where
  ``path="auto"`` takes the sparse gathers. XLA:CPU's row gather of 8% of a [13824, 1280]
  table ran at 5-6 GB/s against 22-28 GB/s for a matvec: 4. On TPU and GPU the Pallas
  kernels gather rows by DMA at close to streaming rate; the figure 1 there is the design
  assumption, not yet measured on hardware.
* ``union_gather_cost``: the same for the batch's union gather (sorted, dense index sets).
* ``native_gather_cost``: the same for the native CPU kernels' gathers (the per-token FFN's
  rows of K2 and V, the selected keys' halves and values), each row one contiguous pass: 1.
  In one run of ``python -m benchmarks.decode --quick`` on the 2-core Xeon, batch-8 Spark
  decode took 129 ms per token with the native per-token FFN against 147 ms masked (XLA's
  per-token gathers: 180 ms).
* ``native_max_rows`` / ``native_max_rows_narrow``: products of 1 up to this many rows with a
  float32 / bfloat16 weight run the native CPU kernel when the implementation is ``native``
  (:mod:`pallas_kernels.linear`); 0 never does (TPU and GPU have no native kernel).
  ``python -m benchmarks.native_products`` on the 2-core Intel Xeon (AVX-512, AMX), one
  [9216, 2304] weight: float32 at 1.05-1.06x XLA's speed up to 4 rows, 0.80x at 8 and 0.76x
  at 16 (the kernel is compute-bound there, XLA's dot is not); bfloat16 2.9-5.4x faster than
  XLA's elementwise form at 1-16 rows (0.95-4.25 ms against 2.9-23 ms).
* ``blockwise_min_len``: attention whose score tensors would hold at least this many squared
  entries per head (a training sequence of at least this many tokens; a prefill chunk whose
  length times its key count reaches the square) runs blockwise
  (:mod:`pallas_kernels.blockwise_attention`) when ``ModelConfig.attn_impl`` is ``"auto"``;
  smaller ones build the score tensors at once. ``python -m benchmarks.long_context`` (with
  ``--time-lens 256,512,1024 --prefill-lens 1024``) on the 2-core Xeon, ``small`` presets at
  batch 1, 256 x 128 blocks: a train step at 256 tokens took 0.418 / 0.400 s (dense / Spark)
  materialized against 0.394 / 0.400 s blockwise, at 512 tokens 0.898 / 0.917 s against
  0.791 / 0.854 s, at 1024 tokens 2.17 / 2.63 s against 1.61 / 1.99 s; prefilling 1024
  tokens in chunks of 256 (over a 1024-slot cache) took 0.29 / 0.44 s against 0.25 / 0.37 s:
  512. The accelerators' 512 is the same figure, not measured there. (A Spark sequence with
  the native CPU kernels on one device attends blockwise at any length; see
  :func:`sparse_jax.model.attention_native.native_blockwise`.)
* ``keys_left_max_rows``: attention scores of up to this many query rows per kv head (a
  decode step, or a short chunk) are computed with the keys as the left operand of the dot,
  ``[S, M]``, then transposed: on CPU that ran 6.7 ms against 11 ms for an 8192-key decode
  step. Long query blocks (training) keep the queries on the left, which needs no transpose
  of the [M, S] scores. 0 always puts the queries on the left.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    """Decode formulation and cost constants of one backend (see the module docstring).

    Attributes:
      elementwise_max_rows: largest row count computed by the elementwise product form;
        0 computes every product with a dot.
      gather_cost: cost of a gathered row in streamed rows, > 0.
      union_gather_cost: cost of a row of the batch's union gather in streamed rows, > 0.
      native_gather_cost: ``gather_cost`` of the native kernels' gathers, > 0.
      keys_left_max_rows: largest query-row count per kv head whose scores take the keys as
        the left operand; 0 never does.
      native_max_rows: largest row count of a float32-weight product run by the native
        kernel; 0 never.
      native_max_rows_narrow: the same for bfloat16 weights.
      blockwise_min_len: the shortest sequence that attends blockwise under ``attn_impl=
        "auto"`` (its square: the fewest score entries per head of a blockwise prefill
        chunk), >= 1.
    """

    elementwise_max_rows: int
    gather_cost: float
    union_gather_cost: float
    keys_left_max_rows: int = 0
    native_gather_cost: float = 1.0
    native_max_rows: int = 0
    native_max_rows_narrow: int = 0
    blockwise_min_len: int = 512

    def __post_init__(self) -> None:
        for name in (
            "elementwise_max_rows",
            "keys_left_max_rows",
            "native_max_rows",
            "native_max_rows_narrow",
            "blockwise_min_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"BackendPolicy.{name}={value!r} must be an integer >= 0")
        for name in ("gather_cost", "union_gather_cost", "native_gather_cost"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BackendPolicy.{name}={getattr(self, name)!r} must be > 0")

    @property
    def elementwise(self) -> bool:
        """Whether any product takes the elementwise form."""
        return self.elementwise_max_rows > 0

    def row_gather_cost(self, native: bool) -> float:
        """Cost of a gathered row in streamed rows, by the native kernels or by XLA."""
        return self.native_gather_cost if native else self.gather_cost

    def native_rows(self, weight_dtype) -> int:
        """The largest row count the native kernel runs for a weight of ``weight_dtype``."""
        if jnp.dtype(weight_dtype) == jnp.float32:
            return self.native_max_rows
        if jnp.dtype(weight_dtype) == jnp.bfloat16:
            return self.native_max_rows_narrow
        return 0


CPU = BackendPolicy(
    elementwise_max_rows=16,
    gather_cost=4.0,
    union_gather_cost=2.0,
    keys_left_max_rows=64,
    native_max_rows=4,
    native_max_rows_narrow=16,
)
ACCELERATOR = BackendPolicy(elementwise_max_rows=0, gather_cost=1.0, union_gather_cost=1.0)
POLICIES = {"cpu": CPU, "tpu": ACCELERATOR, "gpu": ACCELERATOR}


def policy_for(backend: str | None = None) -> BackendPolicy:
    """The policy of ``backend`` (default: JAX's default backend).

    Called while tracing, so each compiled program follows the backend it is built for. A
    backend without an entry gets plain dots: the CPU formulation runs only on CPU.
    """
    return POLICIES.get(backend or jax.default_backend(), ACCELERATOR)
