"""Spark attention of a prefill chunk's queries from their raw predictor scores: soft-cap,
positions' mask and statistical threshold, then the kept keys' other half and values only."""

from pallas_kernels.scored_attention.api import spark_scored_attention

__all__ = ["spark_scored_attention"]
