"""RAR training: next-token CE in a per-sample random order, annealed to raster.

Batch (pre-tokenized): ``{"tokens": int32 (B, L), "label": int32 (B,)}``.
Each sample uses a random permutation with probability ``r(step)`` (1 until
``randomness_anneal_start``, linear to 0 at ``randomness_anneal_end``), else the
raster order; class labels are replaced by the null class with probability
``config.train.label_dropout`` (for classifier-free guidance).

Image grids every ``config.train.image_every`` steps: see ``generator``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import errors
from genvis_jax.models.layers import drop_labels
from genvis_jax.models.rar import permute
from genvis_jax.train.tasks.generator import GeneratorTask


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


class RARTask(GeneratorTask):
  """One parameter group ``"model"``; metrics loss / accuracy / r; sample
  grids (``GeneratorTask``)."""

  data_sources = ("tokens",)   # batches of pre-tokenized codes

  def __init__(self, config):
    super().__init__(config)
    self.anneal = (int(self.hparam("train.randomness_anneal_start")),
                   int(self.hparam("train.randomness_anneal_end")))
    num_steps = int(self.hparam("train.num_steps"))
    if self.anneal[1] > num_steps:   # e.g. --config.train.num_steps alone
      logging.warning(
          "config.train.randomness_anneal_end=%d is past config.train."
          "num_steps=%d: the run ends on %.0f%% random orders, but sampling "
          "decodes in raster order. Set the anneal points with the steps (the "
          "paper's: 50%% and 75%% of them, --config.train.randomness_anneal_"
          "start=%d --config.train.randomness_anneal_end=%d).", self.anneal[1],
          num_steps, 100 * float(randomness_ratio(num_steps, *self.anneal)),
          num_steps // 2, num_steps * 3 // 4)
    self.label_dropout = float(self.hparam("train.label_dropout"))

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


TASK = RARTask
