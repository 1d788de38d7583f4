"""FAR training: mean over the k sub-tokens of the next-token cross-entropy.

Batch (pre-tokenized FQGAN codes): ``{"tokens": int32 (B, k, N) or (B, k*N),
"label": int32 (B,)}`` with the sub-token maps in the tokenizer's order (vis,
sem[_mid, sem_high]). Class labels become the null class with probability
``config.model.class_dropout`` inside the model (train mode), as officially.
Image grids every ``config.train.image_every`` steps: see ``generator``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from genvis_jax import errors
from genvis_jax.train.tasks.generator import GeneratorTask


def subtoken_names(k: int) -> tuple[str, ...]:
  """Metric names of the sub-tokens in order."""
  return {1: ("vq",), 2: ("vis", "sem"),
          3: ("vis", "sem_mid", "sem_high")}.get(k, tuple(f"sub{i}" for i in range(k)))


def far_loss(logits, codes):
  """logits (B, k, N, V), codes (B, k, N) -> (mean of the k CEs, CE (k,), acc (k,)).

  Every sub-token's logits are aligned with its own target (see ``FAR``), so
  the loss is the plain per-token CE; each sub-token is averaged over B*N first.
  """
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
  ce = ce.mean(axis=(0, 2))
  acc = jnp.mean(jnp.argmax(logits, -1) == codes, axis=(0, 2))
  return ce.mean(), ce, acc


def as_codes(tokens, k: int, n: int):
  """(B, k, N) or (B, k*N) int tokens -> (B, k, N); a clear error otherwise."""
  if tokens.ndim == 2 and tokens.shape[1] == k * n:
    return tokens.reshape(tokens.shape[0], k, n)
  if tokens.ndim == 3 and tokens.shape[1:] == (k, n):
    return tokens
  raise errors.ConfigError(
      f"batch['tokens'] must be (B, {k}, {n}) or (B, {k * n}); got {tokens.shape}. "
      "Check the pre-tokenized data against config.model.num_codebooks / grid.")


class FARTask(GeneratorTask):
  """One parameter group ``"model"``; metrics loss and per-sub-token CE/acc;
  sample grids (``GeneratorTask``)."""

  data_sources = ("tokens",)   # batches of pre-tokenized codes

  def __init__(self, config):
    super().__init__(config)
    self.names = subtoken_names(self.model.num_codebooks)

  def grads(self, params, frozen, batch, rng, step):
    del frozen, step
    codes = as_codes(batch["tokens"], self.model.num_codebooks,
                     self.model.seq_len).astype(jnp.int32)
    labels = batch["label"].astype(jnp.int32)

    def loss_fn(p):
      logits = self.model.apply({"params": p}, codes, labels, train=True,
                                rngs={"dropout": rng})
      loss, ce, acc = far_loss(logits, codes)
      return loss, (ce, acc)

    (loss, (ce, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params["model"])
    metrics = {"loss": loss, "accuracy": acc.mean()}
    for i, name in enumerate(self.names):
      metrics[f"ce_{name}"] = ce[i]
      metrics[f"accuracy_{name}"] = acc[i]
    return {"model": g}, metrics


TASK = FARTask
