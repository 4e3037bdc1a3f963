"""Dense products of few rows with a weight stored [out, in]: ``y = x . w^T``.

``native`` is the C++ CPU kernel and ``reference`` the oracle. The XLA formulations the model
runs elsewhere (dots, and on CPU the fenced elementwise forms) are
:mod:`sparse_jax.model.products`, which calls ``native`` where the backend policy says so.
"""
