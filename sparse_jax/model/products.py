"""The model's weight products, in the formulation of the backend's policy.

Every weight is stored with its input axis last and its outputs before it ([out..., in]),
except Spark's value branch K2 and down projection V, which hold one FFN neuron per row so that
decoding can gather the active neurons' rows. At batch 1 decoding reads each weight once per
token, so the layout decides the speed: on this project's 2-core CPU a float32 matvec whose
weight is stored [out, in] (contracting the minor axis) streamed at 23-28 GB/s, against
15-21 GB/s for [in, out] (measured on Gemma-2 2B shapes, weights larger than the caches).

:func:`linear` (weights [out..., in]) and :func:`linear_rows` (weights [in, out], one input per
row) are the products training, prefill and decoding all use. How they are computed is the
backend policy's (:mod:`sparse_jax.policy`): on CPU, a few rows (and one row of a bfloat16
weight) take an elementwise product and sum behind a fusion fence; everywhere else, and for
many rows, a dot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.linear import native as linear_native
from sparse_jax.policy import policy_for


def linear(
    x: jax.Array,
    w: jax.Array,
    dtype: str | jnp.dtype = jnp.float32,
    after: jax.Array | None = None,
    native: bool = False,
) -> jax.Array:
    """``x . w`` contracting x's last axis with w's last axis (a weight stored [out..., in]).

    Args:
      x: [..., in] activations.
      w: [out..., in] weight (any number of output axes), float32 or narrower.
      dtype: operand dtype of the dot form (the model's compute dtype); the elementwise forms
        compute in float32.
      after: another product of the same ``x`` that this one is computed after (see
        :func:`linear_many`).
      native: products of as many rows as the policy gives the native CPU kernel
        (:meth:`sparse_jax.policy.BackendPolicy.native_rows`) run it
        (:mod:`pallas_kernels.linear`); it reads float32 and bfloat16 weights in one pass.

    Returns:
      [..., out...] float32.
    """
    lead, width = x.shape[:-1], x.shape[-1]
    outs = w.shape[:-1]
    rows = math.prod(lead)
    if native and 0 < rows <= policy_for().native_rows(w.dtype):
        y = linear_native.linear(x.reshape(rows, width), w.reshape(math.prod(outs), width))
        return y.reshape(*lead, *outs)
    form = _form(rows, w.dtype)
    if form == "dot":
        # x keeps its leading axes (under a sharding plan each keeps its partitioning); the
        # weight's output axes are merged, a free reshape: with two output axes left apart
        # XLA:CPU's matvec of q [8, 256, 2304], k and v took 17 ms against 0.84 ms.
        y = jnp.einsum(
            "...i,oi->...o",
            x.astype(dtype),
            w.reshape(math.prod(outs), width).astype(dtype),
            preferred_element_type=jnp.float32,
        )
        return y.reshape(*lead, *outs)
    # Fenced: fused producers would run once per output.
    x2 = _fence(x.reshape(rows, width).astype(jnp.float32), after)
    w2 = w.reshape(math.prod(outs), width)
    if form == "one_narrow_row":
        y = _fence(jnp.sum(w2.astype(jnp.float32) * x2[0], axis=-1)[None])
    else:
        y = _fence(jnp.sum(w2[None].astype(jnp.float32) * x2[:, None, :], axis=-1))
    return y.reshape(*lead, *outs)


def linear_many(
    x: jax.Array,
    weights: tuple[jax.Array, ...],
    dtype: str | jnp.dtype = jnp.float32,
    native: bool = False,
) -> tuple[jax.Array, ...]:
    """:func:`linear` of one input with several weights (q, k and v; the gate and up).

    In the elementwise forms each product's input fence waits for the previous product, so
    the products stay apart: with one shared fence XLA fused two products of one input into
    one loop that ran 70x slower (8 rows against two [9216, 2304] float32 weights: 814 ms
    against 11.5 ms).
    """
    out: list[jax.Array] = []
    for w in weights:
        out.append(linear(x, w, dtype, after=out[-1] if out else None, native=native))
    return tuple(out)


def linear_rows(a: jax.Array, w: jax.Array, dtype: str | jnp.dtype = jnp.float32) -> jax.Array:
    """``a @ w`` for a weight stored [in, out] (one input per row, as Spark's V).

    Args:
      a: [..., in] activations.
      w: [in, out] weight, float32 or narrower.
      dtype: operand dtype of the dot form.

    Returns:
      [..., out] float32.
    """
    lead = a.shape[:-1]
    rows = math.prod(lead)
    form = _form(rows, w.dtype)
    if form == "dot":
        return jnp.einsum(
            "...i,io->...o", a.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
        )
    a2 = _fence(a.reshape(rows, a.shape[-1]).astype(jnp.float32))
    if form == "one_narrow_row":
        y = _fence(jnp.sum(a2[0][:, None] * w.astype(jnp.float32), axis=0)[None])
    else:
        y = _fence(jnp.sum(a2[:, :, None] * w[None].astype(jnp.float32), axis=1))
    return y.reshape(*lead, w.shape[-1])


def _form(rows: int, weight_dtype) -> str:
    """The backend policy's formulation for a product of ``rows`` rows with a weight.

    Where the policy allows it (CPU): a single row of a narrow (bfloat16) weight and 2 to
    ``elementwise_max_rows`` rows take an elementwise product and sum; a single float32 row
    stays a dot (a matvec, which XLA streams; the elementwise form on one row is orders of
    magnitude slower). Elsewhere every product is a dot.
    """
    policy = policy_for()
    if not policy.elementwise or rows == 0:
        return "dot"
    if rows == 1:
        return "one_narrow_row" if weight_dtype != jnp.float32 else "dot"
    return "few_rows" if rows <= policy.elementwise_max_rows else "dot"


def _fence(y: jax.Array, after: jax.Array | None = None) -> jax.Array:
    """Returns y unchanged, behind a conditional that XLA cannot fuse across.

    XLA's CPU backend fuses elementwise producers and consumers (softcap's tanh, gelu) into
    an elementwise product-and-sum, and the fused loop then runs about 10x slower (a bfloat16
    [256000, 2304] matvec followed by a tanh: 3.4 s fused, 0.25 s fenced); optimisation
    barriers do not stop it. Both branches are the same, so the predicate does not matter.
    With ``after``, the predicate also reads ``after``, so the fence waits for it and is never
    merged with another fence of the same y.
    """
    salt = 0.0 if after is None else after.ravel()[0].astype(jnp.float32)
    return jax.lax.cond(y.ravel()[0] > salt, _plus_zero, _plus_zero, y)


def _plus_zero(y: jax.Array) -> jax.Array:
    return y + 0.0
