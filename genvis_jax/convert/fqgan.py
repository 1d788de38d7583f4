"""Official FQGAN state dict (showlab/FQGAN ``tokenizer/vq_model_dual.py`` /
``vq_model_triple.py``, e.g. ``fqgan_dual_ds16.pt["model"]``) -> params of
``genvis_jax.models.fqgan.FQGAN``.

Rename + transpose only. ``RENAMES`` is the family's one official -> Flax
module-name table: the LlamaGen trunk and decoder's (``llamagen_vq.RENAMES``:
``nin_shortcut`` -> ``shortcut``) and open_clip's names of the adapters' and
feature heads' ViT blocks, which are the shared ``models/layers/vit.Block``;
the open_clip ``transformer`` ModuleList is ``vit.Encoder`` (``block_{i}``):
  encoder.visual_head.0.transformer.3.attn.in_proj_weight (3W, W)
      -> encoder/visual_head_0/transformer/block_3/attn/qkv/kernel (W, 3W)
  encoder.semantic_head_mid.0.transformer.0.mlp.c_fc.weight (4W, W)
      -> encoder/semantic_head_mid_0/transformer/block_0/mlp/fc1/kernel (W, 4W)
  feat_pred_head.transformer.2.ln_1.weight
      -> feat_pred_head/transformer/block_2/norm1/scale
  encoder.visual_head.0.positional_embedding -> .../positional_embedding (unchanged)
  quantize_sem.embedding.weight (K, D) -> quantize_sem/embedding (unchanged)
  feat_pred_head.upscale.2.weight -> feat_pred_head/upscale_2/kernel (transposed)
Dropped: the ``quantize_*.codebook_used`` usage buffers, and the feature
heads (``feat_pred_head``, ``*_sem_feat_pred``) that ``model.feat_heads`` does
not ask for, so a tokenizer-only config (``feat_heads=()``) loads the released
files, which carry the heads.
"""

from __future__ import annotations

import re

import numpy as np

from genvis_jax.convert import llamagen_vq, tree
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError
from genvis_jax.models import fqgan

# Adapter lists of the released Dual / Triple models (used without a config).
OFFICIAL_ADAPTERS = ("visual_head", "semantic_head", "semantic_head_mid",
                     "semantic_head_high")
# Official module name -> Flax module name (models/fqgan.py, layers/vit.Block).
RENAMES = {**llamagen_vq.RENAMES, "ln_1": "norm1", "ln_2": "norm2",
           "in_proj": "qkv", "out_proj": "out", "c_fc": "fc1", "c_proj": "fc2"}
# torch MultiheadAttention keeps its fused projection as attn parameters.
_PARAMS = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias"}
# open_clip ``transformer.{i}`` -> the ViT tower's ``transformer/block_{i}``.
_BLOCK = re.compile(r"(^|\.)transformer\.(\d+)\.")
_TABLES = ("positional_embedding", "class_embedding")


def _model_names(model_config):
  """(adapter list names, wanted feature-head names or None = keep all)."""
  if model_config is None:
    return OFFICIAL_ADAPTERS, None
  module = fqgan.build(model_config)
  adapters = tuple(fqgan.adapter_name(b) for b in module.branches)
  heads = {fqgan.feat_head_name(b) for b, _ in module.feat_heads}
  return adapters, heads


def is_feat_head(key: str) -> bool:
  """True for keys of an official feature-prediction head."""
  top = key.split(".", 1)[0]
  return top == "feat_pred_head" or top.endswith("_feat_pred")


def _check_heads(state_dict, heads) -> None:
  present = {k.split(".", 1)[0] for k in state_dict if is_feat_head(k)}
  absent = sorted(heads - present)
  if not absent or not any(k.startswith("quantize_") for k in state_dict):
    return   # another model's file: the whole comparison says what differs
  if present:
    raise CheckpointMismatchError(
        f"The model config has feature heads {absent} and the checkpoint has "
        f"others, {sorted(present)}: it is the other FQGAN variant's (Dual "
        "has one semantic head, Triple two). Convert it with that variant's "
        "config (configs/fqgan_dual_ds16.py vs configs/fqgan_triple_ds16.py, "
        "or their ds8).")
  raise CheckpointMismatchError(
      f"The model config has feature heads {absent} but the checkpoint has "
      "none (trained without them). Set "
      "model.feat_heads=() to load the tokenizer without feature heads, or "
      "convert a checkpoint trained with them.")


def fqgan_leaf(key: str, value: np.ndarray, lists: tuple[str, ...]):
  """Flax path and leaf of one official (non-buffer) FQGAN parameter."""
  if key.startswith("quantize_") and key.endswith(".embedding.weight"):
    return key.split(".", 1)[0] + "/embedding", value
  module, _, name = key.rpartition(".")
  if name in _TABLES:
    return "/".join(tree.module_path(module, lists) + [name]), value
  if name in _PARAMS:
    key = f"{module}.{_PARAMS[name]}"
  key = _BLOCK.sub(r"\1transformer.block.\2.", key)
  return tree.convnet_leaf(key, value, lists, RENAMES)


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Official keys -> Flax params (sizes come from the arrays).

  ``model_config`` picks the branches' adapter names and which feature heads
  to keep; ``None`` keeps every head of the released Dual / Triple layouts.
  """
  adapters, heads = _model_names(model_config)
  if heads is not None:
    _check_heads(state_dict, heads)
  lists = llamagen_vq.LISTS + ("block", "upscale") + adapters
  items = []
  for key, value in state_dict.items():
    if key.startswith("quantize_") and key.endswith(".codebook_used"):
      continue
    if heads is not None and is_feat_head(key) and key.split(".", 1)[0] not in heads:
      continue
    items.append(fqgan_leaf(key, value, lists))
  return tree.nest(items)
