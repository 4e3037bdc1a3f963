"""Checkpoint formats: today's, and how a checkpoint of an earlier one is read into it.

* ``sparse_jax/1``: projections stored inputs first (``wq`` [D, N, H], ``wk`` and ``wv``
  [D, K, H], ``wo`` [N, H, D], ``w_gate`` and ``w_up`` [D, F], ``w_down`` [F, D], ``k1``
  [R, F]); the train state also held an RNG key (``rng``, two uint32 words) that no step read.
* ``sparse_jax/2``: the layout of :mod:`sparse_jax.model.weights` (inputs last) and a train
  state without a key.

A format-1 checkpoint is restored in its own layout and then each weight is transposed into
today's, optimizer moments included (they share the parameters' leaf names and shapes), so
it loads for serving and training resumes from it. The files on disk are never rewritten: the
next checkpoint a resumed run saves is in today's format.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

FORMAT = "sparse_jax/2"
FORMAT_1 = "sparse_jax/1"
FORMATS = (FORMAT_1, FORMAT)

# Leaf name -> the axis permutation from the format-1 layout to today's, over the leaf's
# trailing axes (a scanned stack has a leading layer axis in front): today's axis i is
# format 1's axis PERMUTATIONS[name][i].
PERMUTATIONS: dict[str, tuple[int, ...]] = {
    "wq": (1, 2, 0),  # [D, N, H] -> [N, H, D]
    "wk": (1, 2, 0),  # [D, K, H] -> [K, H, D]
    "wv": (1, 2, 0),
    "wo": (2, 0, 1),  # [N, H, D] -> [D, N, H]
    "w_gate": (1, 0),  # [D, F] -> [F, D]
    "w_up": (1, 0),
    "w_down": (1, 0),  # [F, D] -> [D, F]
    "k1": (1, 0),  # [R, F] -> [F, R]
}
# The train state's RNG key in format 1: jax.random.key_data of a threefry key.
RNG_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def check_format(fmt: Any, where: str) -> None:
    """Raises ValueError unless ``fmt`` is a checkpoint format this version reads."""
    if fmt not in FORMATS:
        raise ValueError(
            f"{where} has checkpoint format {fmt!r}; this version of sparse_jax reads {FORMATS}"
        )


def _leaf_permutation(path: Any, ndim: int) -> tuple[int, ...] | None:
    """The full-rank permutation (format 1 -> today) of the leaf at ``path``, or None."""
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    name = keys[-1] if keys else None
    perm = PERMUTATIONS.get(name)
    if perm is None or ndim < len(perm):
        return None
    lead = ndim - len(perm)
    return tuple(range(lead)) + tuple(lead + a for a in perm)


def format1_targets(tree: Any) -> Any:
    """Today's abstract arrays (shapes, dtypes, shardings) -> the format-1 ones to restore.

    A NamedSharding's partition spec is permuted with its array, so each shard of a
    format-1 weight is read where the same values live today.
    """

    def one(path: Any, leaf: Any) -> Any:
        perm = _leaf_permutation(path, len(leaf.shape))
        if perm is None:
            return leaf
        inverse = tuple(int(i) for i in np.argsort(perm))
        shape = tuple(leaf.shape[i] for i in inverse)
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            sharding = NamedSharding(sharding.mesh, P(*(spec[i] for i in inverse)))
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, tree)


def from_format1(tree: Any, shardings: Any = None) -> Any:
    """Format-1 arrays -> today's layout (transposed where the layout changed).

    Args:
      tree: restored arrays (parameters, or any tree holding parameter-named leaves such as
        an optimizer state).
      shardings: optional tree of target shardings (today's); default: wherever XLA puts them.
    """

    def convert(t: Any) -> Any:
        def one(path: Any, leaf: Any) -> Any:
            perm = _leaf_permutation(path, leaf.ndim)
            return leaf if perm is None else jnp.transpose(leaf, perm)

        return jax.tree_util.tree_map_with_path(one, t)

    return jax.jit(convert, out_shardings=shardings)(tree)
