"""Serving: checkpoints loaded for use, text generation, and the OpenAI-compatible server.

``loading`` (``sparse_jax.load``), ``textgen`` (text in, text out), ``engine`` (continuous
batching over one KV cache: ``slots``, ``tickets``, ``row_sampling``), and the HTTP server
(``protocol``, ``app``, ``listen``) that ``serve.py`` runs. Nothing is imported here, so that
loading a checkpoint does not import the web stack.
"""
