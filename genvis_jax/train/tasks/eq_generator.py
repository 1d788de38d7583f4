"""Equivariant generator training (``config.task = "eq_generator"``); the
flow-matching loss and schedules in ``genvis_jax.train.tasks.eq``.

Sample grids (``GeneratorTask``): "samples" at the training width and, with
``config.sample.wide_columns``, "samples_wide" that many columns wide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import errors
from genvis_jax.kernels import windowed_attention
from genvis_jax.models.eq_tokenizer import sample_posterior
from genvis_jax.models.layers import drop_labels
from genvis_jax.train.tasks.eq import flow_loss, flow_targets, rope_shifts
from genvis_jax.train.tasks.generator import GeneratorTask


class EqGeneratorTask(GeneratorTask):
  """Batch: {"image": (B, H, W, 3) in [-1, 1] or "latents": (B, L, C) posterior
  means, "label": (B,)}. One group "model"; metrics loss, shift (the batch's
  mean RoPE shift), latent_std."""
  # Images are encoded on the fly by the frozen tokenizer (``self.tokenizer``,
  # in config.tokenizer.dtype as pretokenize encodes: the same latents), so
  # it is loaded whether or not the grids are on.
  encodes_with_tokenizer = True
  grid_size = 8   # not 16: the wide grid's images are many times as wide

  def __init__(self, config):
    super().__init__(config)
    self.label_dropout = float(self.hparam("train.label_dropout"))
    self.shift_num = int(self.hparam("flow.shift_num"))
    self.shift_group = int(self.hparam("flow.shift_group"))
    impl = windowed_attention.resolve_impl(self.model.attn_impl)
    if self.model.attn_dropout > 0 and impl.startswith("pallas"):
      # The kernels take no dropout: a setting that silently did nothing.
      logging.info(
          "Training steps attend with dense masked attention: the windowed "
          "kernel (%s, config.model.attn_impl) takes no attention dropout "
          "and config.model.attn_dropout=%g (the official 0.1). The kernel "
          "serves the forwards without dropout (evaluation); sampling "
          "decodes with the rolling window cache.", impl,
          self.model.attn_dropout)

  def encode(self, frozen, batch):
    """Posterior means (B, L, C) from ``batch`` (pre-computed or encoded by
    the frozen tokenizer ``frozen["tokenizer"]``)."""
    if "latents" in batch:
      return batch["latents"].astype(jnp.float32)
    if "tokenizer" not in frozen:
      raise errors.ConfigError(
          "The eq_generator task got images but no tokenizer: set "
          "config.tokenizer.checkpoint to a tokenizer checkpoint (a "
          "genvis_jax.convert output or an eq_tokenizer training workdir), or "
          "feed batches with pre-computed 'latents'.")
    p = jax.lax.stop_gradient(frozen["tokenizer"])
    return self.tokenizer.apply({"params": p}, batch["image"], method="encode")

  def latents(self, frozen, batch, rng):
    """Generator-space latents: (posterior sample or mean) x latents.scale."""
    mean = self.encode(frozen, batch)
    lt = self.config.latents
    z = sample_posterior(mean, rng, self.tokenizer.std) if lt.posterior_noise \
        else mean
    return jax.lax.stop_gradient(z * lt.scale)

  def grads(self, params, frozen, batch, rng, step):
    del step
    f = self.config.flow
    k_lat, k_flow, k_shift, k_label, k_drop = jax.random.split(rng, 5)
    x = self.latents(frozen, batch, k_lat)
    labels = drop_labels(k_label, batch["label"], self.label_dropout,
                         self.model.null_label)
    noise, t = flow_targets(x, k_flow, int(f.diffusion_batch_mul), f.t_eps)
    shift = rope_shifts(k_shift, x.shape[0], self.shift_num, self.shift_group)

    def loss_fn(p):
      v, _ = self.model.apply({"params": p}, x, labels, noise, t, train=True,
                              shift=shift, rngs={"dropout": k_drop})
      return flow_loss(v, noise, x)

    loss, g = jax.value_and_grad(loss_fn)(params["model"])
    return {"model": g}, {"loss": loss,
                          "shift": jnp.mean(shift.astype(jnp.float32)),
                          "latent_std": jnp.std(x)}

  def grid_configs(self, batch):
    """``config.sample`` at the training width (the visual batch's columns)
    as "samples" and at ``sample.wide_columns`` (if set) as "samples_wide";
    the other sampling settings (steps, guidance, dtype) as configured."""
    width = (batch["latents"].shape[1] if "latents" in batch
             else batch["image"].shape[2] // self.tokenizer.token_width)
    grids = []
    for name, cols in (("samples", width),
                       ("samples_wide", int(self.config.sample.get(
                           "wide_columns", 0)))):
      if cols:
        sample_config = self.config.sample.copy_and_resolve_references()
        sample_config.num_columns = int(cols)
        grids.append((name, sample_config))
    return tuple(grids)


TASK = EqGeneratorTask
