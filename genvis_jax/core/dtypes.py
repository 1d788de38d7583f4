"""Dtype names of configs (``model.dtype``, ``tokenizer.dtype``,
``sample.dtype``) -> jnp dtypes, one check with one message shape."""

from __future__ import annotations

import jax.numpy as jnp

from genvis_jax.errors import ConfigError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def parse(value, setting: str, allowed: tuple[str, ...] = FLOAT_DTYPES,
          hint: str = ""):
  """``value`` (a dtype name or jnp dtype; None / '' = unset) -> a jnp dtype,
  or None when unset (the caller's default applies).

  Raises:
    ConfigError: ``value`` names no dtype in ``allowed``; the message names
      ``setting`` (e.g. "config.sample.dtype"), the allowed names and
      ``hint`` (what they mean where it is read).
  """
  if value is None or (isinstance(value, str) and not value):
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in allowed:
    raise ConfigError(f"{setting}={value!r} is not a supported dtype here; "
                      f"use one of {', '.join(map(repr, allowed))}{hint}.")
  return dtype
