"""Public entry point of the dense product: validation and dispatch."""

import jax
import jax.numpy as jnp

from pallas_kernels._common import dispatch
from pallas_kernels.linear import native, xla


def linear(x: jax.Array, w: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """``y[..., o] = sum_i x[..., i] * w[o, i]``, float32 accumulation and result.

    Args:
      x: [..., I] activations.
      w: [O, I] weight, float32 or bfloat16.
      implementation: ``"auto"`` (the native kernel on CPU when built, else XLA), ``"xla"``
        or ``"native"``; the Pallas names run XLA's dot (there is no Pallas kernel: on TPU
        and GPU a dot runs on the matrix units).

    Returns:
      [..., O] float32.

    Raises:
      ValueError: mismatched shapes, or a weight dtype the native kernel does not take.
      dispatch.ImplementationUnavailableError: ``"native"`` where it cannot run.
    """
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x must be [..., I] and w [O, I] with one I, got {x.shape}, {w.shape}")
    name = dispatch.resolve_implementation(implementation, False)
    if name == "native":
        if w.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"the native kernel takes float32 or bfloat16 weights, got {w.dtype}")
        return native.linear(x, w)
    return xla.linear(x, w)
