"""One decode step's whole attention (one query per row over a cache and its own key), dense
and Spark, as one native CPU kernel."""

from pallas_kernels.decode_attention.api import dense_decode_attention, spark_decode_attention

__all__ = ["dense_decode_attention", "spark_decode_attention"]
