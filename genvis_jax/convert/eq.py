"""Official Equivariant image modeling checkpoints (drx-code/EquivariantModeling)
-> params of ``genvis_jax.models.eq_tokenizer`` / ``eq_generator``.

Rename + transpose only (``official_to_flax``):
  decoder.up.4.attn.0.q.weight (C, C, 1, 1) -> decoder/up_4/attn_0/q/kernel (HWIO)
  encoder.encoder1d.weight (O, I, k) (Conv1d) -> encoder/encoder1d/kernel (k, I, O)
  encoder_blocks.3.mlp.fc1.weight (O, I) -> encoder_blocks_3/mlp/fc1/kernel (I, O)
  encoder_blocks.3.attn2.qkv.weight (the cross-attention query)
      -> encoder_blocks_3/cross_attn/q/kernel (generator: ``GENERATOR_RENAMES``)
  encoder.mid.block_1.norm1.weight (C,) -> encoder/mid/block_1/norm1/scale
  encoder.down.2.block.0.nin_shortcut.weight -> encoder/down_2/block_0/shortcut/kernel
    (tokenizer module names the shared blocks of models/layers/resnet.py
    call otherwise: ``TOKENIZER_RENAMES``)
  class_emb.weight -> class_emb/embedding; other names (fake_latent) unchanged.

``tokenizer.ckpt`` (Lightning; ``--key=state_dict``) stores the EMA weights as
LitEma buffers whose names lost their dots (``ema_decoder.conv_inweight``); they
are matched against the dot-free official names of the model's own parameters.
Without ``ema_`` keys the plain keys are used. Dropped: LitEma's ``decay`` /
``num_updates``, the training-only ``loss.*`` modules, and the official semantic
decoder's never-used ``down.{i}.block.2`` (when the model has no such block).
``places_large.ckpt``: convert ``--key=model_ema`` with kind ``eq_generator``.
The kinds themselves are ``convert/eq_tokenizer.py`` and ``eq_generator.py``.
"""

from __future__ import annotations

import itertools
import re

import numpy as np

from genvis_jax.convert import tree

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Official tokenizer module name -> Flax module name (one level each way).
TOKENIZER_RENAMES = tree.RESNET_RENAMES
_OFFICIAL_MODULES = {v: k for k, v in TOKENIZER_RENAMES.items()}


def flax_leaf(key: str, value: np.ndarray):
  """One official key -> (Flax path, leaf in Flax layout)."""
  names: list[str] = []
  for part in generator_key(key).split("."):
    if part.isdigit() and names:
      names[-1] += "_" + part          # ModuleList index joins its list name
    else:
      names.append(part)
  names = tree.rename_modules(names[:-1], TOKENIZER_RENAMES) + names[-1:]
  if names[-1] == "weight":
    if value.ndim == 4:
      names[-1], value = "kernel", tree.conv(value)
    elif value.ndim == 3:            # Conv1d (O, I, k) -> (k, I, O)
      names[-1], value = "kernel", value.transpose(2, 1, 0)
    elif value.ndim == 2 and names[-2] == "class_emb":
      names[-1] = "embedding"
    elif value.ndim == 2:
      names[-1], value = "kernel", tree.linear(value)
    else:
      names[-1] = "scale"
  return "/".join(names), value


def official_to_flax(state_dict: dict) -> dict:
  """``{official name: array}`` -> nested Flax params (numpy views)."""
  return tree.nest([flax_leaf(k, np.asarray(v)) for k, v in state_dict.items()])


def official_names(path: tuple[str, ...]) -> list[str]:
  """Flax path -> every dotted official name mapping onto it: ``block_1`` may be
  ``block.1`` (a list index) or the attribute ``block_1``; both are kept since
  only one of them occurs in a checkpoint."""
  *mods, leaf = path
  options = []
  for m in mods:
    m = _OFFICIAL_MODULES.get(m, m)
    head, _, idx = m.rpartition("_")
    options.append((m, f"{head}.{idx}") if head and idx.isdigit() else (m,))
  leaf = _LEAF_NAMES.get(leaf, leaf)
  return [".".join(c + (leaf,)) for c in itertools.product(*options)]


# --- generator ------------------------------------------------------------------

# Official generator block module -> Flax module (the shared attention's names).
GENERATOR_RENAMES = {"attn.proj": "attn.out", "attn2.qkv": "cross_attn.q",
                     "attn2.k": "cross_attn.k", "attn2.v": "cross_attn.v",
                     "attn2.proj": "cross_attn.out"}
_GENERATOR_BLOCK = re.compile(r"^(encoder_blocks\.\d+\.)(attn2?\.\w+)(\.\w+)$")


def generator_key(key: str) -> str:
  """``encoder_blocks.3.attn2.qkv.weight`` -> ``encoder_blocks.3.cross_attn.q.weight``
  (``GENERATOR_RENAMES``); any other key unchanged."""
  m = _GENERATOR_BLOCK.match(key)
  if m is None or m.group(2) not in GENERATOR_RENAMES:
    return key
  return m.group(1) + GENERATOR_RENAMES[m.group(2)] + m.group(3)
