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
"""

from __future__ import annotations

import itertools
import re

import jax
import numpy as np

from genvis_jax.convert import tree

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_UNUSED_SEMANTIC = re.compile(r"^semantic_decoder\.down\.\d+\.block\.2\.")
_LITEMA_BUFFERS = ("decay", "num_updates")
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


def _model_official_names(model_config) -> dict[str, str]:
  """Dot-free official name -> dotted official name, for the model's params."""
  from genvis_jax import convert  # the package imports this module lazily
  shapes = convert.model_shapes(model_config)
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    for name in official_names(tuple(str(p.key) for p in path)):
      out[name.replace(".", "")] = name
  return out


def _from_ema(state_dict: dict, model_config) -> dict:
  """``ema_<module>.<dot-free name>`` -> dotted official names; unmatched keys
  keep their name (reported as unexpected)."""
  names = _model_official_names(model_config)
  out = {}
  for key, value in state_dict.items():
    if not key.startswith("ema_"):
      continue                         # the raw (non-averaged) weights
    module, _, flat = key[len("ema_"):].partition(".")
    if flat in _LITEMA_BUFFERS:
      continue
    out[names.get(module + flat, key)] = value
  return out


def _drop_unused(state_dict: dict, model_config) -> dict:
  """Drops ``loss.*`` and the semantic decoder's unused ``down.{i}.block.2``
  (ema or plain) unless the model has that block."""
  names = _model_official_names(model_config)
  dotted = set(names.values())
  def unused(k):
    if k.startswith(("loss.", "ema_loss.")):
      return True
    if k.startswith("ema_semantic_decoder."):
      flat = k[len("ema_"):].replace(".", "")
      return (re.match(r"^semantic_decoderdown\d+block2", flat) is not None
              and flat not in names)
    return _UNUSED_SEMANTIC.match(k) is not None and k not in dotted
  return {k: v for k, v in state_dict.items() if not unused(k)}


def convert_eq_tokenizer(state_dict: dict, model_config) -> dict:
  """Lightning ``state_dict`` (EMA buffers preferred) -> tokenizer params."""
  state_dict = _drop_unused(state_dict, model_config)
  if any(k.startswith("ema_") for k in state_dict):
    state_dict = _from_ema(state_dict, model_config)
  return official_to_flax(state_dict)


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


def convert_eq_generator(state_dict: dict, model_config) -> dict:
  """``places_large.ckpt["model_ema"]`` (or ``["model"]``) -> generator params."""
  del model_config  # names and shapes are checked by from_torch
  return official_to_flax(state_dict)
