"""Spark attention of many queries per kv head from their predictor scores (prefill chunks):
the statistical threshold, then the kept keys' other half and values only."""

from pallas_kernels.scored_attention.api import spark_scored_attention

__all__ = ["spark_scored_attention"]
