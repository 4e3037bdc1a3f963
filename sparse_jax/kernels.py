"""The one seam between the model and the Pallas kernels of :mod:`pallas_kernels`.

Every sparse op that has a kernel reaches it through a :class:`Kernels` value:

* :meth:`Kernels.soft_topk` and :meth:`Kernels.mask_topk`: statistical top-k of the Spark FFN
  and Spark attention in the model (training, evaluation, prefill of a full sequence);
* :meth:`Kernels.blockwise_attention`: dense and Spark attention of a long block over its
  own keys in O(T x block) memory (training, evaluation, prefill above a length threshold);
* :meth:`Kernels.sparse_ffn` and :meth:`Kernels.topk_attention`: the decode path's gathered
  FFN over the active neurons and attention over the selected keys;
* :meth:`Kernels.spark_decode_attention` and :meth:`Kernels.dense_decode_attention`: a decode
  step's whole attention in one native CPU kernel (scores, threshold, kept keys), used
  where :meth:`Kernels.native` holds; :meth:`Kernels.spark_scored_attention`: a Spark prefill
  chunk's attention from its raw predictor scores (threshold and kept keys only), likewise;
* :meth:`Kernels.linear`, :meth:`Kernels.linear_many`, :meth:`Kernels.linear_rows`: every
  weight product of the model (:mod:`sparse_jax.model.products`), dense layers included.

``implementation`` is one of ``"auto"``, ``"xla"``, ``"native"``, ``"pallas_tpu"``,
``"pallas_gpu"``. ``"auto"`` resolves by JAX's default backend (TPU -> ``pallas_tpu``, GPU ->
``pallas_gpu``, CPU -> ``native`` when the C++ kernels are built, else ``xla``); ``"xla"``
runs each op's ``xla`` module in ``pallas_kernels`` (the statistical top-k with its
closed-form backward), the same code the op's API runs for ``"xla"``; ``"native"`` runs the
C++ kernels of the ops that have one (the weight products of few rows, the gathered FFN and
the gathered decode attention) and XLA for the statistical top-k; an explicit implementation
on a backend that cannot run it raises
:class:`pallas_kernels._common.dispatch.ImplementationUnavailableError` when the op is traced,
never a silent fallback. ``interpret=True`` runs an explicit Pallas implementation in Pallas
interpret mode on any backend (the tests use it on CPU to check the model end to end).

With a ``mesh``, kernel calls run per shard under ``jax.shard_map``. With sharding ``rules``
(the model passes its plan's), each operand is split as the rules split its logical axes, the
same rules as the parameters: under tensor parallelism the FFN width and the attention heads
stay split. A statistical top-k whose reduced axis is split (the FFN width over a tensor axis)
runs the op's XLA code per shard with ``axis_name``: its moments and cap are combined by
``psum``/``pmax`` of per-row scalars inside the mapped function, never an all-gather of the
row. Without rules the leading (batch) axis is split over ``batch_axes`` and every other axis
is whole on each shard.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels._common import dispatch
from pallas_kernels._common import sharding as kernel_sharding
from pallas_kernels.blockwise_attention import api as blockwise_attention_api
from pallas_kernels.decode_attention import api as decode_attention_api
from pallas_kernels.scored_attention import api as scored_attention_api
from pallas_kernels.sparse_ffn import api as sparse_ffn_api
from pallas_kernels.sparse_ffn import native as sparse_ffn_native
from pallas_kernels.sparse_ffn import xla as sparse_ffn_xla
from pallas_kernels.stat_topk import api as stat_topk_api
from pallas_kernels.stat_topk import xla as stat_topk_xla
from pallas_kernels.topk_attention import api as topk_attention_api
from pallas_kernels.topk_attention import xla as topk_attention_xla

IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS
GPU_BLOCKWISE_MAX_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which implementation the model's sparse ops run (hashable: a static jit argument).

    Attributes:
      implementation: ``"auto"``, ``"xla"``, ``"native"``, ``"pallas_tpu"`` or
        ``"pallas_gpu"``.
      interpret: run an explicit Pallas implementation in Pallas interpret mode.
      mesh: when set, kernel calls run per shard over this mesh.
      batch_axes: mesh axes that split the leading axis of each kernel operand (without
        ``rules``).
      rules: logical-axis sharding rules (:class:`sparse_jax.parallel.sharding.ShardingRules`)
        that split each operand of the statistical top-k by its logical axes.
    """

    implementation: str = "auto"
    interpret: bool = False
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ("data",)
    rules: Any = None

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        if self.interpret and self.implementation not in ("pallas_tpu", "pallas_gpu"):
            raise ValueError(
                "interpret=True applies only to implementation='pallas_tpu' or 'pallas_gpu', "
                f"got implementation={self.implementation!r}"
            )
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes))

    def resolved(self) -> str:
        """The concrete implementation here: "xla", "native", "pallas_tpu" or "pallas_gpu".

        Raises:
          ImplementationUnavailableError: an explicit Pallas implementation on a backend that
            cannot run it (and ``interpret`` is False).
        """
        return dispatch.resolve_implementation(self.implementation, self.interpret)

    def _kernel_args(self) -> dict:
        return dict(
            implementation=self.resolved(),
            interpret=self.interpret,
            mesh=self.mesh,
            batch_axes=self.batch_axes,
        )

    def native(self) -> bool:
        """Whether the weight products run the native CPU kernel (never under a mesh: the
        custom call is not partitioned, so XLA's products keep the weights' sharding)."""
        return self.mesh is None and self.resolved() == "native"

    def linear(
        self,
        x: jax.Array,
        w: jax.Array,
        dtype: Any = jnp.float32,
        after: jax.Array | None = None,
    ) -> jax.Array:
        """:func:`sparse_jax.model.products.linear` in this implementation."""
        from sparse_jax.model import products  # the model package imports this module

        return products.linear(x, w, dtype, after, native=self.native())

    def linear_many(
        self, x: jax.Array, weights: tuple[jax.Array, ...], dtype: Any = jnp.float32
    ) -> tuple[jax.Array, ...]:
        """:func:`sparse_jax.model.products.linear_many` in this implementation."""
        from sparse_jax.model import products

        return products.linear_many(x, weights, dtype, native=self.native())

    def linear_rows(self, a: jax.Array, w: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """:func:`sparse_jax.model.products.linear_rows` in this implementation."""
        from sparse_jax.model import products

        return products.linear_rows(a, w, dtype)

    def _use_kernel(self, method: str) -> bool:
        name = self.resolved()
        if name in ("xla", "native"):  # the statistical top-k has no native kernel
            return False
        if method != "statistical":
            if self.implementation != "auto":
                raise ValueError(
                    f"topk_method={method!r} is an XLA baseline with no Pallas kernel; use "
                    f"implementation='auto' or 'xla' with it, not {self.implementation!r}"
                )
            return False
        return True

    def _spec(self, shape: tuple[int, ...], logical: tuple[str | None, ...] | None) -> Any:
        """The PartitionSpec of a kernel operand on :attr:`mesh`."""
        if self.rules is None or logical is None:
            return PartitionSpec(kernel_sharding.batch_entry(self.batch_axes))
        return self.rules.spec(logical, shape, dict(self.mesh.shape))

    def _stat_topk(
        self, x: jax.Array, k: int, valid: jax.Array | None, form: str, logical: Any
    ) -> jax.Array:
        """The Pallas statistical top-k, per shard when there is a mesh."""
        name = self.resolved()
        if self.mesh is None:
            return stat_topk_api.statistical_topk(
                x, k, valid=valid, form=form, implementation=name, interpret=self.interpret
            )
        spec = self._spec(x.shape, logical)
        split = (tuple(spec) + (None,) * x.ndim)[x.ndim - 1]
        in_specs = (spec, None if valid is None else spec)
        if split is None:
            # Whole rows on every shard: the kernel runs per shard as is.
            def per_shard(x_, valid_):
                return stat_topk_api.statistical_topk(
                    x_, k, valid=valid_, form=form, implementation=name, interpret=self.interpret
                )

            return kernel_sharding.maybe_shard_map(per_shard, self.mesh, in_specs, spec)(x, valid)
        # The reduced axis is split: per-row moments and cap are combined across its shards.
        xla_fn = stat_topk_xla.statistical_topk
        if form == "mask":
            xla_fn = stat_topk_xla.statistical_topk_mask

        def per_shard_xla(x_, valid_):
            return xla_fn(x_, k, valid=valid_, axis_name=split)

        return jax.shard_map(per_shard_xla, mesh=self.mesh, in_specs=in_specs, out_specs=spec)(
            x, valid
        )

    def soft_topk(
        self,
        x: jax.Array,
        k: int,
        *,
        enabled: jax.Array | bool = True,
        method: str = "statistical",
        logical: tuple[str | None, ...] | None = None,
    ) -> jax.Array:
        """Soft statistical top-k ``max(x - theta, 0)`` over the last axis of x [..., d].

        ``enabled`` (a traced bool is fine) false returns x unchanged. ``logical`` names x's
        axes for the sharding rules. Differentiable.
        """
        if not self._use_kernel(method):
            return stat_topk_xla.statistical_topk(x, k, enabled=enabled, method=method)
        if k >= x.shape[-1]:
            return x
        out = self._stat_topk(x, k, None, "soft", logical)
        return jnp.where(enabled, out, x)

    def mask_topk(
        self,
        x: jax.Array,
        k: int,
        *,
        valid: jax.Array,
        enabled: jax.Array | bool = True,
        method: str = "statistical",
        logical: tuple[str | None, ...] | None = None,
    ) -> jax.Array:
        """Mask form ``where(x >= theta, x, -inf)`` over valid entries of x [..., d].

        ``valid`` broadcasts to x; invalid entries give -inf; ``enabled`` false keeps every
        valid entry. ``logical`` names x's axes for the sharding rules.
        """
        if not self._use_kernel(method):
            return stat_topk_xla.statistical_topk_mask(
                x, k, valid=valid, enabled=enabled, method=method
            )
        valid = jnp.broadcast_to(valid, x.shape)
        out = self._stat_topk(x, k, valid, "mask", logical)
        return jnp.where(enabled, out, jnp.where(valid, x, -jnp.inf))

    def sparse_ffn(
        self, h: jax.Array, idx: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array
    ) -> jax.Array:
        """Decode-time Spark FFN over gathered neurons; see ``pallas_kernels.sparse_ffn``.

        Returns [B, D] float32.
        """
        if self.resolved() == "xla":
            return sparse_ffn_xla.sparse_ffn(h, idx, x_rest, k2, v)
        out = sparse_ffn_api.sparse_ffn(h, idx, x_rest, k2, v, **self._kernel_args())
        return out.astype(jnp.float32)

    def sparse_ffn_block(
        self, act: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array
    ) -> jax.Array:
        """The Spark FFN of a block of tokens from its activations act [M, F], neuron by
        neuron (native CPU kernel; see :func:`pallas_kernels.sparse_ffn.native.
        sparse_ffn_block`). Returns [M, D] float32."""
        self._native_only()
        return sparse_ffn_native.sparse_ffn_block(act, x_rest, k2, v)

    def spark_ffn_block(
        self, pre: jax.Array, x_rest: jax.Array, k2: jax.Array, v: jax.Array, *, keep_count: int
    ) -> tuple[jax.Array, jax.Array]:
        """The Spark FFN of a block of tokens from its pre-activations pre [M, F], with the
        statistical threshold and the gelu in the kernel (native CPU; see
        :func:`pallas_kernels.sparse_ffn.native.spark_ffn_block`). Returns y [M, D] and the
        active neurons per token [M], float32."""
        self._native_only()
        return sparse_ffn_native.spark_ffn_block(pre, x_rest, k2, v, keep_count=keep_count)

    def topk_attention(
        self,
        q_rest: jax.Array,
        p: jax.Array,
        idx: jax.Array,
        k_rest: jax.Array,
        v: jax.Array,
    ) -> jax.Array:
        """Decode attention over the selected keys; see ``pallas_kernels.topk_attention``.

        Returns [B, N, H] float32.
        """
        if self.resolved() == "xla":
            return topk_attention_xla.topk_attention(q_rest, p, idx, k_rest, v)
        out = topk_attention_api.topk_attention(
            q_rest, p, idx, k_rest, v, head_axis=None, **self._kernel_args()
        )
        return out.astype(jnp.float32)

    def spark_decode_attention(self, *arrays: jax.Array, top_k: int, softcap: float | None):
        """One decode step's Spark attention as the native kernel; see
        :func:`pallas_kernels.decode_attention.spark_decode_attention` (same arrays).

        Returns out [B, N, H] and kept keys [B, N], float32.
        """
        return decode_attention_api.spark_decode_attention(
            *arrays, top_k=top_k, softcap=softcap, implementation=self._native_only()
        )

    def dense_decode_attention(self, *arrays: jax.Array, softcap: float | None):
        """One decode step's dense attention as the native kernel; see
        :func:`pallas_kernels.decode_attention.dense_decode_attention` (same arrays)."""
        return decode_attention_api.dense_decode_attention(
            *arrays, softcap=softcap, implementation=self._native_only()
        )

    def spark_scored_attention(self, *arrays: jax.Array, top_k: int, softcap: float | None):
        """A prefill chunk's Spark attention from its raw predictor scores as the native
        kernel; see :func:`pallas_kernels.scored_attention.spark_scored_attention` (same
        arrays).

        Returns out [B, K, G, T, H] and kept keys [B, K, G, T], float32.
        """
        return scored_attention_api.spark_scored_attention(
            *arrays, top_k=top_k, softcap=softcap, implementation=self._native_only()
        )

    def _native_only(self) -> str:
        if not self.native():
            raise ValueError(
                "this op is a native CPU kernel only; this Kernels resolves to "
                f"{self.resolved()!r}" + (" under a mesh" if self.mesh is not None else "")
            )
        return "native"

    def blockwise_attention(
        self,
        q: tuple[jax.Array, ...],
        keys: tuple[jax.Array, ...],
        v: jax.Array,
        q_pos: jax.Array,
        k_pos: jax.Array,
        window: jax.Array | int,
        **options: Any,
    ) -> tuple[jax.Array, jax.Array]:
        """Blockwise attention; see ``pallas_kernels.blockwise_attention``. ``options`` are
        its keyword options (``enabled``, ``softcap``, ``top_k``, ``block_q``, ``block_k``).

        The Pallas GPU kernel holds its tiles in registers, so its blocks are capped at
        ``GPU_BLOCKWISE_MAX_BLOCK`` (the block of Pallas' own GPU flash attention). The XLA
        implementation is partitioned by XLA like the rest of the model. ``"native"`` runs
        Spark as the C++ kernels on one device; under a mesh it runs the XLA scan, since XLA
        does not partition a custom call. A Pallas one
        under a mesh runs per shard: the batch split as the sharding ``rules`` split
        ``batch`` (over ``batch_axes`` without rules) and the kv heads as they split
        ``kv_heads``; a sequence is always whole on its shard.

        Returns:
          out [B, K, G, T, H] float32 and the attended keys per query [B, K, G, T] float32.
        """
        name = self.resolved()
        if name == "native" and self.mesh is not None:
            name = "xla"  # the custom call is not partitioned; XLA's scan is
        if name == "pallas_gpu":
            for key in ("block_q", "block_k"):
                if key in options:
                    options[key] = min(options[key], GPU_BLOCKWISE_MAX_BLOCK)
        call = functools.partial(
            blockwise_attention_api.blockwise_attention,
            implementation=name,
            interpret=self.interpret,
        )
        enabled = jnp.asarray(options.pop("enabled", True), bool)
        window = jnp.asarray(window, jnp.int32)
        if self.mesh is None or name in ("xla", "native"):
            return call(q, keys, v, q_pos, k_pos, window, enabled=enabled, **options)

        def per_shard(q_, keys_, v_, q_pos_, k_pos_, window_, enabled_):
            return call(q_, keys_, v_, q_pos_, k_pos_, window_, enabled=enabled_, **options)

        heads = ("batch", "kv_heads", None, None, None)

        def spec(shape: tuple[int, ...]) -> PartitionSpec:
            return self._spec(shape, heads[: len(shape)] if len(shape) > 2 else ("batch", None))

        parts = lambda xs: tuple(spec(x.shape) for x in xs)  # noqa: E731
        scalar = PartitionSpec()
        in_specs = (
            parts(q), parts(keys), spec(v.shape), spec(q_pos.shape), spec(k_pos.shape), scalar,
            scalar,
        )  # fmt: skip
        out_specs = (spec(q[0].shape), spec(q[0].shape[:-1]))
        return kernel_sharding.maybe_shard_map(per_shard, self.mesh, in_specs, out_specs)(
            q, keys, v, q_pos, k_pos, window, enabled
        )


DEFAULT_KERNELS = Kernels()
XLA_KERNELS = Kernels("xla")
