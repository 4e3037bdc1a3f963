"""Score activations of the row-gather kernels, written with ops Mosaic and Triton lower."""

import jax.numpy as jnp

ACTIVATIONS = ("identity", "softplus")


def apply(activation: str, s: jnp.ndarray) -> jnp.ndarray:
    """Applies ``activation`` to float32 scores ``s`` (any shape)."""
    if activation == "identity":
        return s
    # Stable softplus: max(s, 0) + log1p(exp(-|s|)).
    return jnp.maximum(s, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(s)))
