"""Official RAR state dict (bytedance/1d-tokenizer ``modeling/rar.py``) -> Flax params.

Rename + transpose only. Module names (``RENAMES``, the one table of names that
differ): the shared attention's output projection is ``out``:
  blocks.{i}.attn.proj.weight (out, in)       -> blocks_{i}/attn/out/kernel (in, out)
  blocks.{i}.attn.qkv.weight (out, in)        -> blocks_{i}/attn/qkv/kernel (in, out)
  blocks.{i}.norm1.weight, attn.q_norm.weight -> .../norm1/scale, .../q_norm/scale
  blocks.{i}.adaLN_modulation.1.weight        -> blocks_{i}/adaLN_modulation/kernel
    (index 1 = the Linear after the SiLU inside nn.Sequential)
  embeddings.weight (V, d)                    -> embeddings/embedding (unchanged)
  cls_token, pos_embed, target_aware_pos_embed, timesteps_embeddings: unchanged.
"""

from __future__ import annotations

import re

import numpy as np

from genvis_jax.convert import tree

_TABLES = ("cls_token", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
_NORMS = ("norm1", "norm2", "q_norm", "k_norm")
# Official module name -> Flax module name, where they differ.
RENAMES = {"attn.proj": "attn.out", "adaLN_modulation.1": "adaLN_modulation"}
_MODULE = re.compile(
    r"^(blocks\.\d+\.(norm1|norm2|attn\.(qkv|proj|q_norm|k_norm)|mlp\.(fc1|fc2)"
    r"|adaLN_modulation\.1)|adaln_before_head\.adaLN_modulation\.1|lm_head)"
    r"\.(weight|bias)$")


def _flax_key(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if key in _TABLES:
    return key, value
  if key == "embeddings.weight":
    return "embeddings/embedding", value
  if not _MODULE.match(key):
    return key, value  # reported as unexpected by from_torch
  module, kind = key.rsplit(".", 1)
  module = re.sub(r"^blocks\.(\d+)", r"blocks_\1", module)
  for official, flax_name in RENAMES.items():
    module = module.replace(official, flax_name)
  path = module.replace(".", "/")
  if kind == "bias":
    return f"{path}/bias", value
  if module.rsplit(".", 1)[-1] in _NORMS:
    return f"{path}/scale", value
  return f"{path}/kernel", tree.linear(value)


def convert(state_dict: dict[str, np.ndarray], model_config=None) -> dict:
  """Official RAR keys -> the ``params`` tree of ``genvis_jax.models.rar.RAR``.

  ``model_config`` is not needed (sizes come from the arrays); ``from_torch``
  checks the result against it.
  """
  del model_config
  return tree.nest(_flax_key(k, np.asarray(v)) for k, v in state_dict.items())
