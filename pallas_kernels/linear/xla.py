"""The dense product in XLA: a dot with float32 accumulation (the portable path)."""

import jax
import jax.numpy as jnp


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., I] . w [O, I]^T`` -> [..., O] float32."""
    return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32)
