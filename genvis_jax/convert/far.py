"""Official FAR state dict (showlab/FQGAN ``autoregressive/models/far_dual.py`` /
``far_triple.py``, LlamaGen GPT layout; ``--key=model``) -> params of
``genvis_jax.models.far.FAR``.

Rename + transpose only. ``layers.{i}`` / ``ar_head.{i}`` become
``layers_{i}`` / ``ar_head_{i}``; inside a block the shared attention and
gated MLP have their own names (``RENAMES``, the one table of names that
differ):
  layers.{i}.attention.wqkv.weight (3d, d) -> layers_{i}/attention/qkv/kernel (d, 3d)
  layers.{i}.attention.wo.weight           -> layers_{i}/attention/out/kernel
  ar_head.{i}.feed_forward.w1 / w3 / w2    -> ar_head_{i}/feed_forward/fc1_g / fc1_x / fc2
  layers.{i}.attention_norm.weight (d,)    -> layers_{i}/attention_norm/scale (RMSNorm)
  cls_embedding.embedding_table.weight     -> cls_embedding/embedding_table/embedding
  tok_embeddings_{k}.weight                -> tok_embeddings_{k}/embedding
  aggregation_layer, norm, output_{k}      -> same names (kernel transposed)
"""

from __future__ import annotations

import numpy as np

from genvis_jax.convert import tree

LISTS = ("layers", "ar_head")
# Official module name (inside a block) -> Flax module name, where they differ.
RENAMES = {"attention.wqkv": "attention.qkv", "attention.wo": "attention.out",
           "feed_forward.w1": "feed_forward.fc1_g",
           "feed_forward.w3": "feed_forward.fc1_x",
           "feed_forward.w2": "feed_forward.fc2"}


def _is_embedding(module: str) -> bool:
  return (module == "cls_embedding.embedding_table"
          or module.startswith("tok_embeddings_"))


def far_leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One official key -> (Flax path, leaf in Flax layout); layouts
  ``tree.param_leaf`` does not know keep their official name, and all are
  checked against the model by ``from_torch`` (which reports the others as
  unexpected)."""
  module, _, kind = key.rpartition(".")
  if kind == "weight" and value.ndim == 2 and _is_embedding(module):
    return f"{module.replace('.', '/')}/embedding", value
  path = tree.module_path(module, LISTS)
  if len(path) >= 2 and f"{path[-2]}.{path[-1]}" in RENAMES:
    path[-2:] = RENAMES[f"{path[-2]}.{path[-1]}"].split(".")
  return tree.param_leaf("/".join(path), kind, value) or (key, value)


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Official FAR keys -> Flax params (sizes come from the arrays; the
  rotary table ``freqs_cis``, if saved, is recomputed and dropped)."""
  del model_config  # names and shapes are checked by from_torch
  return tree.nest(far_leaf(k, np.asarray(v)) for k, v in state_dict.items()
                   if k != "freqs_cis")
