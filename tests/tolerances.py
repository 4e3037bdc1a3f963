"""Numerical tolerances of the whole suite, in one place: (rtol, atol) per comparison kind."""

# Same math, different op order or fusion (jit vs eager, scan vs loop, remat).
REORDER = dict(rtol=1e-5, atol=1e-5)
# A jnp implementation against a float64 numpy transcription, in float32.
F32_VS_F64 = dict(rtol=2e-4, atol=2e-5)
# Sharded against single-device (collectives change summation order).
SHARDED = dict(rtol=1e-4, atol=1e-5)
# Logits of a whole model, sharded against single-device. Logits reach |5| in the test models;
# summation-order noise near zero logits measured 0.8-1.7e-5 on an AVX-512 CPU (data=8,
# tensor=4), at the edge of SHARDED's atol, so this leaves 3x room on any x86 CPU. A wrong or
# missing collective moves logits by 1e-2 or more.
SHARDED_LOGITS = dict(rtol=1e-4, atol=5e-5)
# Finite differences in float64.
GRAD_FD = dict(rtol=1e-4, atol=1e-6)
# Float32 mean gradient of one batch taken in micro-batches against in one pass, for the micro
# test model (entries up to ~0.25): summation order moves entries by up to ~3e-6, under a tenth
# of this, while a dropped micro-batch or a wrong 1/n scale moves most of them by over 1e-3.
ACCUMULATED_GRADIENT = dict(rtol=1e-4, atol=2e-5)
