"""Classifier training task (cross-entropy on image labels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from genvis_jax import models
from genvis_jax.train.tasks import Task


class ClassifierTask(Task):
  """Batch: {"image": (B, H, W, 3) in [0, 1], "label": (B,) int32}."""

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)

  def loss(self, params, batch):
    logits = self.model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": acc}

  def grads(self, params, frozen, batch, rng, step):
    del frozen, rng, step
    (loss, aux), g = jax.value_and_grad(self.loss, has_aux=True)(
        params["model"], batch)
    return {"model": g}, {"loss": loss, **aux}


TASK = ClassifierTask
