"""timm / DINO ViT weights (e.g. ``dino_deitsmall16_pretrain.pth``, a timm
``vit_small_patch16_224`` state dict) -> params of the DINO discriminator's
frozen ViT (``models.dino_disc.FrozenViT``, the ``vit`` of a ``dino_disc``).

Rename + transpose only, by the table ``NAMES`` (rules in ``convert/vit.py``):
  blocks.3.attn.qkv.weight (3C, C) -> encoder/block_3/attn/qkv/kernel (C, 3C)
  blocks.3.attn.proj -> encoder/block_3/attn/out; blocks.3.ls1.gamma -> .../ls1/scale
  patch_embed.proj.weight (C, 3, p, p) -> embed/patch_embed/kernel (p, p, 3, C)
  cls_token (1, 1, C) -> embed/cls_token (C,); pos_embed (1, 1 + g*g, C)
      -> embed/pos_embed (1 + g*g, C); norm -> norm
A ``module.`` prefix (DDP) is dropped; keys the ViT has no place for (the
classifier ``head``, mask or register tokens) are skipped. Every leaf comes
back as float32 numpy.
"""

from __future__ import annotations

import jax
import numpy as np

from genvis_jax import convert as convert_lib
from genvis_jax.convert import tree
from genvis_jax.convert import vit as cvit

NAMES = cvit.Names(
    top={"patch_embed.proj": "embed/patch_embed", "norm": "norm"},
    tensors={"cls_token": ("embed/cls_token", 1),
             "pos_embed": ("embed/pos_embed", 2)},
    blocks=r"blocks\.(\d+)",
    block={"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn/qkv",
           "attn.proj": "attn/out", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"},
    block_tensors={"ls1.gamma": ("ls1/scale", 1),
                   "ls2.gamma": ("ls2/scale", 1)})


def zero_key_bias(params: dict) -> dict:
  """Zeroes the key third of every block's fused qkv bias (the official DINO
  discriminator does; softmax ignores a key bias anyway). Copies, in place of
  the caller's arrays."""
  for block in params.get("encoder", {}).values():
    bias = np.array(block["attn"]["qkv"]["bias"])
    c = bias.shape[0] // 3
    bias[c:2 * c] = 0.0
    block["attn"]["qkv"]["bias"] = bias
  return params


def convert_dino_vit(state_dict: dict[str, np.ndarray], *,
                     zero_k_bias: bool = False) -> dict:
  """timm ViT ``{key: array}`` -> ``FrozenViT`` params (float32 numpy)."""
  items = []
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    path, leaf = cvit.leaf(key, np.asarray(value, np.float32), NAMES)
    if path != key:                     # a key with no place is skipped
      items.append((path, leaf))
  params = tree.nest(items)
  return zero_key_bias(params) if zero_k_bias else params


def load_dino_vit(path: str, expected=None, *, zero_k_bias: bool = False) -> dict:
  """Reads a local timm ViT state dict (.pth / .bin / .safetensors / .npz,
  through ``convert.load_weights``, no torch, no download) -> ``FrozenViT``
  params, checked against ``expected`` (abstract params of the
  discriminator's ``vit``) when given."""
  params = convert_lib.load_weights(
      path, expected, convert=convert_dino_vit,
      setting="config.disc.vit_path", what="DINO ViT weights",
      fetch="Download the timm / DINO ViT state dict, e.g. "
      "dino_deitsmall16_pretrain.pth (read as is, no conversion)")
  if zero_k_bias:
    params = jax.device_put(zero_key_bias(params))
  return params
