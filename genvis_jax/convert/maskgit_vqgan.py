"""Official MaskGIT VQGAN state dict (1d-tokenizer naming) -> Flax params.

Rename + transpose only:
  encoder.down.2.block.0.conv1.weight (O, I, kh, kw) -> encoder/down_2/block_0/conv1/kernel (kh, kw, I, O)
  encoder.norm_out.weight (C,)                        -> encoder/norm_out/scale
  *.bias                                              -> */bias
  quantize.embedding.weight (1024, 256)               -> quantize/embedding (unchanged)
A list name followed by an index ("down.2", "block.0", "mid.1", "up.4") becomes
one module name ("down_2", ...); the modules the shared blocks of
``genvis_jax/models/layers/resnet.py`` name otherwise are renamed (``RENAMES``):
  encoder.down.2.block.0.nin_shortcut.weight -> encoder/down_2/block_0/shortcut/kernel
  decoder.up.4.upsample_conv.weight          -> decoder/up_4/upsample/conv/kernel
"""

from __future__ import annotations

import numpy as np

from genvis_jax.convert import tree

_LISTS = ("down", "up", "block", "mid")
_PREFIXES = ("encoder", "decoder", "quantize")
# Official module name -> Flax module path (models/maskgit_vqgan.py).
RENAMES = {**tree.RESNET_RENAMES, "upsample_conv": "upsample/conv"}


def _leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if key == "quantize.embedding.weight":
    return "quantize/embedding", value
  if key.split(".")[0] not in _PREFIXES:   # kept: reported as unexpected
    return key, value
  return tree.convnet_leaf(key, value, _LISTS, RENAMES)


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Maps official keys (numpy arrays) to the ``params`` tree of MaskGITVQGAN.

  Values are float32 numpy arrays; check the result against
  ``jax.eval_shape(init_params)`` of the matching config before use
  (``genvis_jax.convert.from_torch("maskgit_vqgan", ...)`` does).
  ``model_config`` is unused (sizes come from the arrays).
  """
  del model_config
  return tree.nest(_leaf(key, np.asarray(value, np.float32))
                   for key, value in state_dict.items())
