"""Image-tokenizer training: reconstruction + LPIPS + VQ + PatchGAN (taming-style).

Groups: "model" (the tokenizer, EMA-tracked) and "disc" (the discriminator,
its own optimizer from ``config.disc.optimizer``). One step computes both groups'
gradients from the same forward pass: the generator sees the discriminator
before its update, the discriminator sees the reconstructions with
``stop_gradient``. The adversarial terms switch on at ``config.loss.disc_start``.
A run that never reaches ``disc_start`` (or has ``gan_weight=0``) leaves the
discriminator out of the compiled step (its gradients are zeros): the same
updates at a lower cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import models
from genvis_jax.models import lpips as lpips_lib
from genvis_jax.train import losses as gan_lib
from genvis_jax.train import optimizers as opt_lib
from genvis_jax.train.metrics import to_uint8
from genvis_jax.train.tasks import Task, register


def reconstruction_loss(kind: str, x, y):
  if kind == "l1":
    return jnp.mean(jnp.abs(x - y))
  if kind == "l2":
    return jnp.mean(jnp.square(x - y))
  raise ValueError(f"Unknown config.loss.reconstruction {kind!r}; use l1 | l2.")


def adaptive_weight(g_rec_last, g_gan_last, max_weight=1e4):
  """taming: |grad rec| / (|grad gan| + 1e-4) at the decoder's last layer."""
  w = jnp.linalg.norm(g_rec_last) / (jnp.linalg.norm(g_gan_last) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def _last_layer(tree):
  return tree["decoder"]["conv_out"]["kernel"]


@register("tokenizer")
class TokenizerTask(Task):
  """Batch: {"image": (B, H, W, 3) in ``value_range``, ...}."""
  param_groups = ("model", "disc")
  ema_group = "model"

  def __init__(self, config):
    super().__init__(config)
    self.value_range = tuple(config.data.get("value_range", (0.0, 1.0)))
    self.model = models.build(config.model)
    self.disc = models.build(config.disc)
    self.d_loss_fn, self.g_loss_fn = gan_lib.gan_losses(config.loss.gan)
    lo = config.loss
    self.use_lpips = bool(lo.perceptual_weight) and bool(lo.lpips_path)
    if lo.perceptual_weight and not lo.lpips_path:
      logging.warning(
          "LPIPS perceptual loss is OFF: config.loss.lpips_path is empty. Convert "
          "the LPIPS VGG weights with `python -m genvis_jax.convert --kind=lpips` "
          "and set --config.loss.lpips_path=FILE.npz to enable it.")
    # Static switch: with the GAN off for the whole run, a weight-0 adversarial
    # term would still cost a discriminator forward + backward every step.
    self.use_gan = gan_lib.gan_active(lo.gan_weight, lo.disc_start,
                                      config.train.num_steps)
    self._lpips_params = None
    self._reconstruct = jax.jit(self.reconstruct)

  # --- construction -------------------------------------------------------
  def init_params(self, rng):
    r1, r2 = jax.random.split(rng)
    return {"model": models.init_params(self.config.model, r1, boxed=True),
            "disc": models.init_params(self.config.disc, r2, boxed=True)}

  def optimizers(self):
    c = self.config
    return {"model": opt_lib.make_optimizer(c.optimizer, c.train),
            "disc": opt_lib.make_optimizer(c.disc.optimizer, c.train)}

  def frozen_params(self):
    if not self.use_lpips:
      return {}
    if self._lpips_params is None:
      self._lpips_params = lpips_lib.load_lpips_params(self.config.loss.lpips_path)
    return {"lpips": self._lpips_params}

  # --- losses -------------------------------------------------------------
  def _adversarial(self, params, recon):
    """Generator GAN loss on ``recon``; 0 without a discriminator pass when off."""
    if not self.use_gan:
      return jnp.zeros((), jnp.float32)
    return self.g_loss_fn(self.disc.apply({"params": params["disc"]}, recon))

  def _generator_terms(self, p_model, params, images, rng, step):
    """(rec_total, adversarial) and aux for the tokenizer parameters."""
    lo = self.config.loss
    recon, aux = self.model.apply({"params": p_model}, images, train=True,
                                  rngs={"dropout": rng})
    rec = reconstruction_loss(lo.reconstruction, recon, images)
    total = lo.reconstruction_weight * rec + lo.quantizer_weight * aux["quantizer_loss"]
    metrics = {"rec_loss": rec}
    if self.use_lpips:
      perc = jnp.mean(lpips_lib.lpips_distance(
          jax.lax.stop_gradient(params["lpips"]), recon, images,
          value_range=self.value_range))
      total = total + lo.perceptual_weight * perc
      metrics["lpips"] = perc
    adv = self._adversarial(params, recon)
    aux = {k: v for k, v in aux.items() if k != "codes"}
    return (total, adv), (recon, {**metrics, **aux})

  def grads(self, params, batch, rng, step):
    lo = self.config.loss
    images = batch["image"]
    gan_on = (step >= lo.disc_start).astype(jnp.float32)

    f = lambda p: self._generator_terms(p, params, images, rng, step)
    (rec_total, adv), vjp, (recon, metrics) = jax.vjp(f, params["model"],
                                                      has_aux=True)
    if self.use_gan and lo.adaptive_gan_weight:
      # Two backward passes: the weight needs both gradients at the last layer.
      (g_rec,) = vjp((jnp.ones_like(rec_total), jnp.zeros_like(adv)))
      (g_adv,) = vjp((jnp.zeros_like(rec_total), jnp.ones_like(adv)))
      w = adaptive_weight(_last_layer(g_rec), _last_layer(g_adv))
      w = w * lo.gan_weight * gan_on
      g_model = jax.tree_util.tree_map(lambda a, b: a + w * b, g_rec, g_adv)
    else:
      w = lo.gan_weight * gan_on if self.use_gan else jnp.zeros_like(adv)
      (g_model,) = vjp((jnp.ones_like(rec_total), w * jnp.ones_like(adv)))
    if not self.use_gan:
      g_disc = jax.tree_util.tree_map(jnp.zeros_like, params["disc"])
      metrics.update(loss=rec_total, gen_loss=rec_total)
      return {"model": g_model, "disc": g_disc}, metrics

    fake = jax.lax.stop_gradient(recon)

    def d_loss(p_disc):
      real_logits = self.disc.apply({"params": p_disc}, images)
      fake_logits = self.disc.apply({"params": p_disc}, fake)
      return gan_on * self.d_loss_fn(real_logits, fake_logits), (
          jnp.mean(real_logits), jnp.mean(fake_logits))

    (d_val, (lr_, lf_)), g_disc = jax.value_and_grad(d_loss, has_aux=True)(
        params["disc"])
    loss = rec_total + w * adv
    metrics.update(loss=loss, gen_loss=rec_total, adv_loss=adv, adv_weight=w,
                   disc_loss=d_val, logits_real=lr_, logits_fake=lf_)
    return {"model": g_model, "disc": g_disc}, metrics

  # --- outputs ------------------------------------------------------------
  def reconstruct(self, p_model, images):
    codes = self.model.apply({"params": p_model}, images, method="encode")
    return self.model.apply({"params": p_model}, codes, method="decode"), codes

  def visualize(self, params, batch, rng):
    images = batch["image"]
    recon, _ = self._reconstruct(params["model"], images)
    recon = jnp.clip(recon, *self.value_range)
    # Originals and reconstructions side by side, one pair per row.
    pairs = jnp.stack([images, recon], axis=1).reshape(-1, *images.shape[1:])
    return {"reconstruction": to_uint8(jax.device_get(pairs), self.value_range)}
