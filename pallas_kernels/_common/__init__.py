"""Helpers shared by the kernel packages: dispatch, sharding and the row-gather kernels."""
