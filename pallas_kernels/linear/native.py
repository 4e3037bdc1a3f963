"""The dense product as a native CPU kernel (XLA FFI custom call ``sparse_jax_linear``).

One pass over the weight, split over XLA's CPU threads; float32 or bfloat16 weights widened
to float32 in registers, float32 accumulation. Differentiable: the backward is XLA's (two
dots), so a model that uses the kernel can still be trained.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _native


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., I] . w [O, I]^T`` -> [..., O] float32, for float32 or bfloat16 ``w``.

    ``x`` is cast to float32. Maps over ``x`` under ``jax.vmap``; mapping over ``w`` is an
    error.

    Raises:
      ValueError: ``w`` is not 2-D float32 or bfloat16, or its last axis is not x's.
    """
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must be [..., I] and w [O, I] with one I, got {x.shape}, {w.shape}")
    if w.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"the native kernel takes float32 or bfloat16 weights, got {w.dtype}")
    _native.load()
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call("sparse_jax_linear", out, vmap_method="expand_dims")
    return call(x.astype(jnp.float32), w)


def _forward(x, w):
    return linear(x, w), (x, w)


def _backward(residuals, g):
    x, w = residuals
    dx = jnp.einsum("...o,oi->...i", g, w.astype(jnp.float32)).astype(x.dtype)
    dw = jnp.einsum("...o,...i->oi", g, x.astype(jnp.float32)).astype(w.dtype)
    return dx, dw


linear.defvjp(_forward, _backward)
