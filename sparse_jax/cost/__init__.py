"""Cost accounting: parameter counts, FLOPs per token and the bytes a decode step reads.

``flops`` (exact parameter counts, FLOPs per token dense-equivalent and sparse),
``decode_bytes`` (the memory-bandwidth bound of decoding) and ``summary`` (``python -m
sparse_jax.cost.summary`` prints every preset).
"""
