"""Kind ``eq_tokenizer``: the official Equivariant tokenizer (Lightning
``tokenizer.ckpt``, ``--key=state_dict``) -> ``models.eq_tokenizer`` params.
Names are mapped by ``convert/eq.py``; the EMA weights (LitEma buffers whose
names lost their dots) are preferred and matched against the dot-free
official names of the model's own parameters.
"""

from __future__ import annotations

import re

import jax

from genvis_jax import models
from genvis_jax.convert import eq

_UNUSED_SEMANTIC = re.compile(r"^semantic_decoder\.down\.\d+\.block\.2\.")
_LITEMA_BUFFERS = ("decay", "num_updates")


def _model_official_names(model_config) -> dict[str, str]:
  """Dot-free official name -> dotted official name, for the model's params."""
  shapes = models.param_shapes(model_config)
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    for name in eq.official_names(tuple(str(p.key) for p in path)):
      out[name.replace(".", "")] = name
  return out


def _from_ema(state_dict: dict, names: dict[str, str]) -> dict:
  """``ema_<module>.<dot-free name>`` -> dotted official names (``names``:
  :func:`_model_official_names`); unmatched keys keep their name (reported
  as unexpected)."""
  out = {}
  for key, value in state_dict.items():
    if not key.startswith("ema_"):
      continue                         # the raw (non-averaged) weights
    module, _, flat = key[len("ema_"):].partition(".")
    if flat in _LITEMA_BUFFERS:
      continue
    out[names.get(module + flat, key)] = value
  return out


def _drop_unused(state_dict: dict, names: dict[str, str]) -> dict:
  """Drops ``loss.*`` and the semantic decoder's unused ``down.{i}.block.2``
  (ema or plain) unless the model has that block."""
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


def convert(state_dict: dict, model_config) -> dict:
  """Lightning ``state_dict`` (EMA buffers preferred) -> tokenizer params."""
  names = _model_official_names(model_config)   # one abstract init
  state_dict = _drop_unused(state_dict, names)
  if any(k.startswith("ema_") for k in state_dict):
    state_dict = _from_ema(state_dict, names)
  return eq.official_to_flax(state_dict)
