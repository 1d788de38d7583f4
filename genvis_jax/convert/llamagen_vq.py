"""Official LlamaGen VQ state dict (FoundationVision/LlamaGen
``tokenizer/tokenizer_image/vq_model.py``, e.g. ``vq_ds16_c2i.pt["model"]``)
-> params of ``genvis_jax.models.llamagen_vq.LlamaGenVQ``.

Rename + transpose only (a list name and its index join: ``res.0`` -> ``res_0``;
the modules the shared blocks of ``genvis_jax/models/layers/resnet.py`` name
otherwise are renamed, ``RENAMES``):
  encoder.conv_blocks.1.res.0.nin_shortcut.weight (O, I, 1, 1)
      -> encoder/conv_blocks_1/res_0/shortcut/kernel (1, 1, I, O)
  decoder.mid.1.norm.weight -> decoder/mid_1/norm/scale
  quantize.embedding.weight (K, D) -> quantize/embedding (unchanged)
``quantize.codebook_used`` (a training-time usage buffer) is dropped.
"""

from __future__ import annotations

import numpy as np

from genvis_jax.convert import tree

LISTS = ("conv_blocks", "res", "attn", "mid")
BUFFERS = ("quantize.codebook_used",)
# Official module name -> Flax module name (models/llamagen_vq.py).
RENAMES = tree.RESNET_RENAMES


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Official keys -> Flax params; sizes come from the arrays."""
  del model_config
  items = []
  for key, value in state_dict.items():
    if key in BUFFERS:
      continue
    if key == "quantize.embedding.weight":
      items.append(("quantize/embedding", value))
    else:
      items.append(tree.convnet_leaf(key, value, LISTS, RENAMES))
  return tree.nest(items)
