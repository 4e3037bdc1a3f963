"""Row gathers of the XLA implementations: ``table[idx]`` at indices known to be in range."""

import jax


def gather_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
    """``table[idx]``: rows [..., W] of a [rows, W] table at in-range indices.

    The promise skips XLA's clamping of each index, which costs a pass over the indices.
    """
    return table.at[idx].get(mode="promise_in_bounds")
