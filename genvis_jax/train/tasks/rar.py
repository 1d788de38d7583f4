"""RAR training: next-token CE in a per-sample random order, annealed to raster.

Batch (pre-tokenized): ``{"tokens": int32 (B, L), "label": int32 (B,)}``.
Each sample uses a random permutation with probability ``r(step)`` (1 until
``randomness_anneal_start``, linear to 0 at ``randomness_anneal_end``), else the
raster order; class labels are replaced by the null class with probability
``config.train.label_dropout`` (for classifier-free guidance).

Image grids (every ``config.train.image_every`` steps): samples of the current
weights with the compiled KV-cache sampler and ``config.sample`` settings,
decoded by ``config.tokenizer`` (off, with a warning, without its checkpoint).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.models.layers import drop_labels
from genvis_jax.models.rar import permute
from genvis_jax.sample import rar as rar_sample
from genvis_jax.train import optimizers as opt_lib
from genvis_jax.core.metrics import to_uint8
from genvis_jax.train.tasks import Task


def randomness_ratio(step, anneal_start: int, anneal_end: int):
  """r(step): 1 before ``anneal_start``, linear to 0 at ``anneal_end``, then 0."""
  step = jnp.asarray(step, jnp.float32)
  span = max(float(anneal_end - anneal_start), 1.0)
  return jnp.clip(1.0 - (step - anneal_start) / span, 0.0, 1.0)


def sample_orders(rng, batch_size: int, seq_len: int, r):
  """(B, L) int32 orders: per sample a random permutation w.p. ``r``, else raster."""
  k_use, k_perm = jax.random.split(rng)
  perms = jax.vmap(lambda k: jax.random.permutation(k, seq_len))(
      jax.random.split(k_perm, batch_size))
  use = jax.random.uniform(k_use, (batch_size,)) < r
  raster = jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len))
  return jnp.where(use[:, None], perms, raster).astype(jnp.int32)


def ar_loss(logits, targets):
  """logits (B, 1+L, V), targets (B, L) -> (mean CE, token accuracy).

  The last position (after the final token) has no target and is dropped.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  acc = jnp.mean(jnp.argmax(logits, -1) == targets)
  return loss, acc


class RARTask(Task):
  """One parameter group ``"model"``; metrics loss / accuracy / r."""

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)
    self.anneal = (int(self.hparam("train.randomness_anneal_start")),
                   int(self.hparam("train.randomness_anneal_end")))
    self.label_dropout = float(self.hparam("train.label_dropout"))
    self._tokenizer_params = None
    tok = config.get("tokenizer")
    # Pixel range of the sample grids: the tokenizer model's own.
    has_tok = tok is not None and tok.get("model", {}).get("name", "")
    self.tokenizer_range = (models.value_range(tok.model, config,
                                               ("tokenizer",))
                            if has_tok else None)

  def init_params(self, rng):
    return {"model": models.init_params(self.config.model, rng, boxed=True)}

  def optimizers(self):
    return {"model": opt_lib.make_optimizer(self.config.optimizer,
                                            self.config.train)}

  def grads(self, params, frozen, batch, rng, step):
    del frozen
    tokens, labels = batch["tokens"], batch["label"]
    if tokens.ndim != 2 or tokens.shape[1] != self.model.seq_len:
      raise errors.ConfigError(f"batch['tokens'] must be (B, {self.model.seq_len}); got "
                       f"{tokens.shape}. Check config.data / config.model.seq_len.")
    b, n = tokens.shape
    k_order, k_label, k_drop = jax.random.split(rng, 3)
    r = randomness_ratio(step, *self.anneal)
    orders = sample_orders(k_order, b, n, r)
    labels = drop_labels(k_label, labels, self.label_dropout,
                         self.model.null_label)
    targets = permute(tokens, orders)

    def loss_fn(p):
      logits = self.model.apply({"params": p}, tokens, labels, orders,
                                train=True, rngs={"dropout": k_drop})
      return ar_loss(logits, targets)

    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params["model"])
    return {"model": g}, {"loss": loss, "accuracy": acc, "r": r}

  # --- sample grids -----------------------------------------------------------
  def frozen_params(self):
    """The tokenizer that decodes the sample grids (only when grids are on)."""
    tok = self.config.get("tokenizer")
    if not self.config.train.get("image_every"):
      return {}
    if tok is None or not tok.get("checkpoint"):
      logging.warning(
          "RAR sample grids are OFF: config.tokenizer.checkpoint is empty. Set "
          "it to the tokenizer the tokens came from to see samples while "
          "training (or config.train.image_every=0 to silence this).")
      return {}
    if self._tokenizer_params is None:
      self._tokenizer_params = models.load_params(
          tok.model, tok.checkpoint, setting="--config.tokenizer.checkpoint")
    return {"tokenizer": self._tokenizer_params}

  @functools.cached_property
  def _decode(self):
    """Jitted ``decode(tokenizer_params, codes)``: one compile per run."""
    tokenizer = models.build(self.config.tokenizer.model)
    return jax.jit(lambda p, c: tokenizer.apply({"params": p}, c,
                                                method="decode"))

  def visualize(self, params, frozen, batch, rng):
    """16 samples of evenly spread classes, decoded: {"samples": uint8}."""
    if "tokenizer" not in frozen:
      return {}
    del batch   # host-local; fixed classes keep every process identical
    n, c = 16, self.model.num_classes
    labels = (jnp.arange(n) * max(1, c // n)) % c
    s = self.config.sample
    codes = rar_sample.sample(self.model, params["model"], labels, rng,
                              guidance_scale=s.guidance_scale,
                              guidance_pow=s.guidance_pow,
                              temperature=s.temperature)
    side = int(round(self.model.seq_len ** 0.5))
    images = self._decode(frozen["tokenizer"], codes.reshape(n, side, side))
    return {"samples": to_uint8(jax.device_get(images), self.tokenizer_range)}


TASK = RARTask
