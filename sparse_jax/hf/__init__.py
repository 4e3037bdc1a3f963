"""Gemma-2 checkpoints from and to Hugging Face (``config.json`` + safetensors + tokenizer).

    python -m sparse_jax.hf import <hf_dir> <workdir>     # then sparse_jax.load(<workdir>)
    python -m sparse_jax.hf export <workdir> <hf_dir>     # then transformers' from_pretrained

Dense Gemma-2 only: Spark has no Hugging Face architecture, so a Spark checkpoint does not
export, and an import always gives the dense model that the file describes.
"""

from sparse_jax.hf.config import ConversionError, config_from_hf, config_to_hf
from sparse_jax.hf.convert import export_checkpoint, import_checkpoint

__all__ = [
    "ConversionError",
    "config_from_hf",
    "config_to_hf",
    "export_checkpoint",
    "import_checkpoint",
]
