"""Data: the corpus (bundled or user files), the SentencePiece tokenizer, Grain pipelines.

``corpus`` (reading documents and the held-out split), ``tokenizer`` (:class:`Tokenizer`)
and ``pipeline`` (:class:`DataConfig` and the packed-window iterators).
"""

from sparse_jax.data.pipeline import DataConfig
from sparse_jax.data.tokenizer import Tokenizer

__all__ = ["DataConfig", "Tokenizer"]
