"""Kind ``eq_generator``: the official Equivariant generator
(``places_large.ckpt``, ``--key=model_ema``) -> ``models.eq_generator`` params.
Names are mapped by ``convert/eq.py`` (``GENERATOR_RENAMES``).
"""

from __future__ import annotations

from genvis_jax import errors
from genvis_jax.convert import eq


def convert(state_dict: dict, model_config) -> dict:
  """``places_large.ckpt["model_ema"]`` (or ``["model"]``) -> generator params.

  Raises ConfigError when the checkpoint's class count differs from
  ``model_config.num_classes`` (the released generator is a 30-class Places
  model; the configs are ImageNet's 1000), naming the override; the other
  names and shapes are checked by ``from_torch``."""
  classes = state_dict.get("class_emb.weight")
  if classes is not None and classes.shape[0] != model_config.num_classes:
    raise errors.ConfigError(
        f"The checkpoint's generator has {classes.shape[0]} classes "
        f"(class_emb.weight {tuple(classes.shape)}), the config "
        f"{model_config.num_classes}: convert (and sample) with "
        f"--config.model.num_classes={classes.shape[0]} (places_large.ckpt "
        "is a 30-class Places model).")
  return eq.official_to_flax(state_dict)
