"""What the generators trained on token files (RAR, FAR) share: the image
grids of ``config.train.image_every``.

Every ``image_every`` steps a grid of 16 samples of evenly spread classes is
drawn from the current weights with the compiled KV-cache sampler and the
``config.sample`` settings (the sampling driver's ``generate``), and decoded
by ``config.tokenizer``; without its checkpoint the grids are off, with a
warning.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import models
from genvis_jax.core.metrics import to_uint8
from genvis_jax.models import inference
from genvis_jax.train.tasks import Task

GRID = 16   # samples per grid


class TokenGeneratorTask(Task):
  """A ``Task`` whose model draws token maps that ``config.tokenizer``
  decodes; subclasses set ``sampler``, the ``genvis_jax.sample`` module
  whose ``generate(model, params, labels, rng, config.sample)`` returns the
  tokenizer's ``decode`` input."""

  sampler: ModuleType
  data_sources = ("tokens",)   # batches of pre-tokenized codes

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)
    self._tokenizer_params = None
    tok = config.get("tokenizer")
    # Pixel range of the sample grids: the tokenizer model's own.
    has_tok = tok is not None and tok.get("model", {}).get("name", "")
    self.tokenizer_range = (models.value_range(tok.model, config,
                                               ("tokenizer",))
                            if has_tok else None)

  def frozen_params(self):
    """The tokenizer that decodes the sample grids (only when grids are on)."""
    tok = self.config.get("tokenizer")
    if not self.config.train.get("image_every"):
      return {}
    if tok is None or not tok.get("checkpoint"):
      logging.warning(
          "%s sample grids are OFF: config.tokenizer.checkpoint is empty. Set "
          "it to the tokenizer the tokens came from to see samples while "
          "training (or config.train.image_every=0 to silence this).",
          self.config.model.name.upper())
      return {}
    if self._tokenizer_params is None:
      self._tokenizer_params = models.load_params(
          tok.model, tok.checkpoint, setting="--config.tokenizer.checkpoint")
    return {"tokenizer": self._tokenizer_params}

  @functools.cached_property
  def _decode(self):
    """Jitted ``decode(tokenizer_params, codes)``: one compile per run, in
    ``config.tokenizer.dtype`` as the sampling driver decodes."""
    tokenizer = models.build(inference.data_model_config(self.config.tokenizer))
    return jax.jit(lambda p, c: tokenizer.apply({"params": p}, c,
                                                method="decode"))

  def visualize(self, params, frozen, batch, rng):
    """16 samples of evenly spread classes, decoded: {"samples": uint8}."""
    if "tokenizer" not in frozen:
      return {}
    del batch   # host-local; fixed classes keep every process identical
    c = self.model.num_classes
    labels = (jnp.arange(GRID) * max(1, c // GRID)) % c
    codes = self.sampler.generate(self.model, params["model"], labels, rng,
                                  self.config.sample)
    images = self._decode(frozen["tokenizer"], codes)
    return {"samples": to_uint8(images, self.tokenizer_range)}
