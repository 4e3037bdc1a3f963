"""The decode tests' shared model variants, sequence length, options and jitted forward."""

import jax
from micro_configs import model_variants
from tolerances import F32_VS_F64

from sparse_jax.decode.step import DecodeOptions
from sparse_jax.model.transformer import forward

# Local window 6 with 20-token sequences: local rings wrap several times.
VARIANTS = model_variants((True, False), (False, True))
BASE = VARIANTS["spark"]
T = 20
# Cached decoding reorders float32 sums (chunked keys, fused projections) against the forward.
CACHED = F32_VS_F64
# One options object (a static jit argument) and few shapes keep compilations shared.
# The oracle of the decode tests: the masked path in XLA (``auto`` would run the native fused
# attention kernel on CPU).
MASKED = DecodeOptions(path="masked", prefill_chunk=4, implementation="xla")
full_forward = jax.jit(forward, static_argnums=0)
