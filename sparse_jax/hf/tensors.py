"""The one table between Gemma-2's Hugging Face tensor names and the library's parameter tree.

Both sides keep a projection's outputs before its inputs (``nn.Linear``'s ``[out, in]``), so
each tensor converts by a reshape alone: ``q_proj`` ``[N*H, D]`` is ``attn/wq`` ``[N, H, D]``,
``o_proj`` ``[D, N*H]`` is ``attn/wo`` ``[D, N, H]``, the rest have the same shape. Gemma's
RMSNorm scales by ``1 + weight``, as the library's norms do, so norm weights copy as they are.
The shapes come from :mod:`sparse_jax.model.weights`, the model's own weight description.
"""

from __future__ import annotations

import dataclasses

from sparse_jax.model.config import ModelConfig
from sparse_jax.model.weights import EMBEDDING, NORM, Weight, layer_weights

EMBEDDING_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"
# (group, leaf) of one block -> the tensor's name inside ``model.layers.{i}.``.
LAYER_NAMES = {
    ("pre_attn_norm", "scale"): "input_layernorm.weight",
    ("post_attn_norm", "scale"): "post_attention_layernorm.weight",
    ("pre_ffn_norm", "scale"): "pre_feedforward_layernorm.weight",
    ("post_ffn_norm", "scale"): "post_feedforward_layernorm.weight",
    ("attn", "wq"): "self_attn.q_proj.weight",
    ("attn", "wk"): "self_attn.k_proj.weight",
    ("attn", "wv"): "self_attn.v_proj.weight",
    ("attn", "wo"): "self_attn.o_proj.weight",
    ("ffn", "w_gate"): "mlp.gate_proj.weight",
    ("ffn", "w_up"): "mlp.up_proj.weight",
    ("ffn", "w_down"): "mlp.down_proj.weight",
}
# Library axes merged into one HF axis: wq's [N, H, D] is [N*H, D]; wo's [D, N, H] is [D, N*H].
MERGED = {"wq": (0, 2), "wk": (0, 2), "wv": (0, 2), "wo": (1, 3)}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and where it lives in the parameter tree.

    Attributes:
      name: the HF name.
      path: keys of the leaf in the scanned parameter tree.
      layer: the block index (the leaf's leading axis), or None for a top-level leaf.
      shape: the leaf's shape without the layer axis.
      hf_shape: the HF tensor's shape.
    """

    name: str
    path: tuple[str, ...]
    layer: int | None
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def _hf_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf not in MERGED:
        return shape
    start, stop = MERGED[leaf]
    merged = 1
    for size in shape[start:stop]:
        merged *= size
    return (*shape[:start], merged, *shape[stop:])


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of a dense Gemma-2 checkpoint of ``cfg``, in the order HF lists them."""
    blocks = layer_weights(cfg)
    names = {group: set(leaves) for group, leaves in blocks.items()}
    table = {group: {leaf for (g, leaf) in LAYER_NAMES if g == group} for group in blocks}
    if names != table:
        raise ValueError(f"{cfg.name} is not a dense Gemma-2 model: its blocks hold {names}")

    def top(name: str, path: tuple[str, ...], weight: Weight) -> Tensor:
        shape = weight.shape(cfg)
        return Tensor(name, path, None, shape, shape)

    out = [top(EMBEDDING_NAME, ("embedder", "embedding"), EMBEDDING)]
    for i in range(cfg.num_layers):
        for (group, leaf), suffix in LAYER_NAMES.items():
            shape = blocks[group][leaf].shape(cfg)
            out.append(
                Tensor(
                    f"model.layers.{i}.{suffix}",
                    ("layers", group, leaf),
                    i,
                    shape,
                    _hf_shape(leaf, shape),
                )
            )
    out.append(top("model.norm.weight", ("final_norm", "scale"), NORM))
    return out
