"""Dense products of few rows with a weight stored [out, in]: ``y = x . w^T``.

``api.linear`` dispatches to the op's XLA dot (``xla``) or the native CPU kernel (``native``);
``reference`` is the oracle.
"""
