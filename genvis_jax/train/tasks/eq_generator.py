"""Equivariant generator training (``config.task = "eq_generator"``); the
flow-matching loss and schedules in ``genvis_jax.train.tasks.eq``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core.metrics import to_uint8
from genvis_jax.models import inference
from genvis_jax.models.eq_tokenizer import sample_posterior
from genvis_jax.models.layers import drop_labels
from genvis_jax.sample import eq_generator as eq_sample
from genvis_jax.train.tasks import Task
from genvis_jax.train.tasks.eq import flow_loss, flow_targets, rope_shifts


class EqGeneratorTask(Task):
  """Batch: {"image": (B, H, W, 3) in [-1, 1] or "latents": (B, L, C) posterior
  means, "label": (B,)}. One group "model"; metrics loss, shift (the batch's
  mean RoPE shift), latent_std."""
  encodes_with_tokenizer = True

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)
    # Images are encoded on the fly (and samples decoded) by this tokenizer,
    # in config.tokenizer.dtype as pretokenize encodes: the same latents.
    self.tokenizer = models.build(inference.data_model_config(config.tokenizer))
    self.value_range = models.value_range(config.tokenizer.model, config,
                                          ("data", "tokenizer"))
    self.label_dropout = float(self.hparam("train.label_dropout"))
    self.shift_num = int(self.hparam("flow.shift_num"))
    self.shift_group = int(self.hparam("flow.shift_group"))
    self._frozen = None
    # One jit for the sample grids' decode: compiled once per width.
    self._decode = jax.jit(self._latents_to_images)

  def frozen_params(self):
    if self._frozen is None:
      self._frozen = {}
      path = self.config.tokenizer.checkpoint
      if path:
        self._frozen["tokenizer"] = models.load_params(
            self.config.tokenizer.model, path,
            setting="--config.tokenizer.checkpoint")
    return self._frozen

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

  def _latents_to_images(self, tokenizer_params, latents):
    return eq_sample.latents_to_images(self.tokenizer, tokenizer_params, latents,
                                       self.config.latents.scale)

  def visualize(self, params, frozen, batch, rng):
    """Samples at the training width and ``sample.wide_columns`` (if set)."""
    if "tokenizer" not in frozen:
      return {}
    sp, n = self.config.sample, min(8, batch["label"].shape[0])
    labels = batch["label"][:n]
    width = (batch["latents"].shape[1] if "latents" in batch
             else batch["image"].shape[2] // self.tokenizer.token_width)
    out = {}
    for name, cols in (("samples", width),
                       ("samples_wide", int(sp.get("wide_columns", 0)))):
      if cols:
        lat = eq_sample.sample(self.model, params["model"], labels, rng,
                               num_columns=cols, guidance_scale=sp.guidance_scale,
                               num_steps=sp.num_steps)
        img = self._decode(frozen["tokenizer"], lat)
        out[name] = to_uint8(img, self.value_range)
    return out


TASK = EqGeneratorTask
