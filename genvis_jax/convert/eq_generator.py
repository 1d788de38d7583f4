"""Kind ``eq_generator``: the official Equivariant generator
(``places_large.ckpt``, ``--key=model_ema``) -> ``models.eq_generator`` params.
Names are mapped by ``convert/eq.py`` (``GENERATOR_RENAMES``).
"""

from __future__ import annotations

from genvis_jax.convert import eq


def convert(state_dict: dict, model_config) -> dict:
  """``places_large.ckpt["model_ema"]`` (or ``["model"]``) -> generator params."""
  del model_config  # names and shapes are checked by from_torch
  return eq.official_to_flax(state_dict)
