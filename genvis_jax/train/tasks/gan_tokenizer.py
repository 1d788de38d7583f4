"""The GAN part of tokenizer training, shared by every tokenizer task.

A ``GANTokenizerTask`` trains groups "model" (the tokenizer, EMA-tracked) and
"disc" (the discriminator). By default from one forward pass, as FQGAN's
``vq_train_dual.py`` does: the generator sees the discriminator before its
update, the discriminator the same reconstructions with ``stop_gradient``. A
subclass with ``update_phases`` (the Equivariant tokenizer, trained by
PyTorch Lightning one optimizer at a time) updates the generator first and
steps the discriminator on a second forward pass of the updated generator. A subclass supplies only its reconstruction terms
(``generator_terms``) and, where it differs, its discriminator call
(``disc_logits``), its random-key split and its metric names.

Generator gradient (taming-transformers ``VQLPIPSWithDiscriminator`` /
``LPIPSWithDiscriminator``): d(rec + w * adv) with
  w = [step >= disc_start] * gan_weight * (adaptive ? r : 1),
  r = |d rec / dW| / (|d adv / dW| + 1e-4) clipped to [0, 1e4], no gradient,
at W = the decoder's last conv kernel. The discriminator loss is
[step >= disc_start] * d_loss(D(x), D(sg[recon])).

A run that never reaches ``disc_start`` (or has a zero GAN weight; see
``losses.gan_active``) compiles no discriminator or adaptive-weight pass: the
model gets the same gradients (the GAN term has weight 0 then), the
discriminator zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import models
from genvis_jax.convert import lpips as convert_lpips
from genvis_jax.core import dtypes
from genvis_jax.models import lpips as lpips_lib
from genvis_jax.train import losses as gan_lib
from genvis_jax.train.tasks import Task

PyTree = dict


def adaptive_weight(g_rec_last, g_gan_last, max_weight=1e4):
  """taming: |grad rec| / (|grad gan| + 1e-4) at the decoder's last layer,
  clipped to [0, max_weight], without gradient."""
  w = jnp.linalg.norm(g_rec_last) / (jnp.linalg.norm(g_gan_last) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def _with_last_layer(gen: dict, kernel) -> dict:
  """``gen`` with ``model/decoder/conv_out/kernel`` replaced by ``kernel``."""
  model = gen["model"]
  dec = model["decoder"]
  conv = {**dec["conv_out"], "kernel": kernel}
  return {**gen, "model": {**model, "decoder": {**dec, "conv_out": conv}}}


class GANTokenizerTask(Task):
  """Batch: {"image": (B, H, W, 3) float in the tokenizer's ``value_range``}.

  Subclass hooks:
    generator_terms(gen, p_disc, frozen, images, rng, step) ->
      ((rec, adv), (recon, metrics)): ``rec`` the float32 scalar of every
      non-adversarial term, ``adv`` the generator GAN loss (use
      ``adversarial``), ``recon`` the (B, H, W, 3) reconstructions.
    disc_logits(p_disc, frozen, images, rng) -> logits.
    split_rng(rng) -> (generator key, real-logits key, fake-logits key).
    gan_metrics(adv, d_weight, w, gan_on) -> the GAN-path metric names.
  """
  param_groups = ("model", "disc")
  ema_group = "model"
  grids_show_batch = True
  # Groups the generator loss differentiates (a subclass may add e.g. logvar).
  generator_groups = ("model",)
  # config.loss key of the GAN weight (taming: disc_weight).
  gan_weight_key = "gan_weight"
  # Adaptive GAN weight (|grad rec| / |grad gan| at the last layer): None
  # lets config.loss.adaptive_gan_weight decide; a subclass may fix it.
  adaptive: bool | None = None

  def __init__(self, config):
    super().__init__(config)
    lo = config.loss
    self.model = models.build(config.model)
    self.disc = models.build(config.disc)
    self.value_range = models.value_range(config.model, config, ("data",))
    self.d_loss_fn, self.g_loss_fn = gan_lib.gan_losses(lo.gan)
    self.gan_weight = float(self.hparam(f"loss.{self.gan_weight_key}"))
    if self.adaptive is None:
      self.adaptive = bool(self.hparam("loss.adaptive_gan_weight"))
    # Static switch: with the GAN off for the whole run, a weight-0 adversarial
    # term would still cost a discriminator forward + backward every step.
    self.use_gan = gan_lib.gan_active(self.gan_weight,
                                      self.hparam("loss.disc_start"),
                                      config.train.num_steps)
    self.perceptual_weight = float(self.hparam("loss.perceptual_weight"))
    self.use_lpips = bool(self.perceptual_weight) and bool(lo.lpips_path)
    if self.perceptual_weight and not lo.lpips_path:
      logging.warning(
          "LPIPS perceptual loss is OFF: config.loss.lpips_path is empty. Convert "
          "the LPIPS VGG weights (two files; README.md, \"Where the files come "
          "from\") with `python -m genvis_jax.convert --kind=lpips "
          "--src=weights/vgg16-397923af.pth,weights/vgg.pth "
          "--dst=weights/vgg_lpips.npz` and set "
          "--config.loss.lpips_path=weights/vgg_lpips.npz to enable it.")
    self._lpips_params = None
    self._reconstruct = jax.jit(self.reconstruct)

  # --- construction -------------------------------------------------------
  def disc_init(self, rng):
    """Trainable discriminator parameters (boxed)."""
    return models.init_params(self.config.disc, rng, boxed=True)

  def init_params(self, rng):
    r1, r2 = jax.random.split(rng)
    return {"model": models.init_params(self.config.model, r1, boxed=True),
            "disc": self.disc_init(r2)}

  def frozen_params(self):
    if not self.use_lpips:
      return {}
    if self._lpips_params is None:
      self._lpips_params = convert_lpips.load_lpips_params(self.config.loss.lpips_path)
    return {"lpips": self._lpips_params}

  # --- pieces ---------------------------------------------------------------
  def perceptual(self, frozen, x, y):
    """(B,) float32 LPIPS distances of images in ``value_range`` (frozen
    weights). The VGG runs in ``config.model.dtype``, as under the official
    recipes' autocast (FQGAN / LlamaGen's ``vq_loss`` inside
    ``autocast(bfloat16)``); its distances are summed in float32."""
    dtype = dtypes.parse(self.config.model.get("dtype"), "config.model.dtype")
    return lpips_lib.lpips_distance(jax.lax.stop_gradient(frozen["lpips"]), x, y,
                                    value_range=self.value_range,
                                    dtype=dtype or jnp.float32)

  def disc_logits(self, p_disc, frozen, images, rng):
    del frozen, rng
    return self.disc.apply({"params": p_disc}, images)

  def adversarial(self, p_disc, frozen, recon, rng):
    """Generator GAN loss on ``recon``; 0 without a discriminator pass when off."""
    if not self.use_gan:
      return jnp.zeros((), jnp.float32)
    return self.g_loss_fn(self.disc_logits(p_disc, frozen, recon, rng))

  def split_rng(self, rng):
    return rng, None, None

  def gan_metrics(self, adv, d_weight, w, gan_on):
    del d_weight, gan_on
    return {"adv_loss": adv, "adv_weight": w}

  def generator_terms(self, gen, p_disc, frozen, images, rng, step):
    raise NotImplementedError

  def _adaptive_weight(self, f, gen):
    """``adaptive_weight`` at W = decoder/conv_out kernel.

    Differentiating w.r.t. W alone leaves only the backward through the disc
    and the last conv (the rest is dead code), so the step needs one full
    backward pass.
    """
    kernel = gen["model"]["decoder"]["conv_out"]["kernel"]
    (rec, _), vjp = jax.vjp(lambda k: f(_with_last_layer(gen, k))[0], kernel)
    one, zero = jnp.ones_like(rec), jnp.zeros_like(rec)
    return adaptive_weight(vjp((one, zero))[0], vjp((zero, one))[0])

  # --- training -----------------------------------------------------------
  def grads(self, params, frozen, batch, rng, step, groups=None):
    """``groups`` (``update_phases``): the generator groups, "disc" or
    both (default); the discriminator's fakes come from ``params`` as given,
    so in a phase after the generator's they are the updated generator's."""
    images = batch["image"]
    k_gen, k_real, k_fake = self.split_rng(rng)
    gan_on = (step >= self.config.loss.disc_start).astype(jnp.float32)
    gen = {g: params[g] for g in self.generator_groups}
    f = lambda p: self.generator_terms(p, params["disc"], frozen, images, k_gen,
                                       step)
    grads, metrics, recon = {}, {}, None
    if groups is None or set(groups) & set(self.generator_groups):
      grads, metrics, recon = self._generator_grads(f, gen, gan_on)
    if groups is not None and "disc" not in groups:
      return grads, metrics
    if not self.use_gan:
      grads["disc"] = jax.tree_util.tree_map(jnp.zeros_like, params["disc"])
      return grads, metrics

    # The discriminator's own phase makes its fakes with a forward pass.
    fake = jax.lax.stop_gradient(f(gen)[1][0] if recon is None else recon)

    def d_loss(p_disc):
      real_logits = self.disc_logits(p_disc, frozen, images, k_real)
      fake_logits = self.disc_logits(p_disc, frozen, fake, k_fake)
      return gan_on * self.d_loss_fn(real_logits, fake_logits), (
          jnp.mean(real_logits), jnp.mean(fake_logits))

    # Before disc_start the gradients are zero (Adam still counts the step,
    # as the official loops do). A lax.cond skipping the pass made every
    # later step 1.7x slower on CPU (the FQGAN demo's tokenizer).
    (d_val, (lr_, lf_)), grads["disc"] = jax.value_and_grad(
        d_loss, has_aux=True)(params["disc"])
    metrics.update(disc_loss=d_val, logits_real=lr_, logits_fake=lf_)
    return grads, metrics

  def _generator_grads(self, f, gen, gan_on):
    """(grads of the generator groups, metrics with "loss", reconstructions)."""
    if self.use_gan:
      d_weight = self.gan_weight
      if self.adaptive:
        d_weight = self._adaptive_weight(f, gen) * d_weight
      w = d_weight * gan_on
    else:
      w = jnp.zeros((), jnp.float32)
    (rec, adv), vjp, (recon, metrics) = jax.vjp(f, gen, has_aux=True)
    (grads,) = vjp((jnp.ones_like(rec), w * jnp.ones_like(adv)))
    if not self.use_gan:
      metrics.update(loss=rec)
    else:
      metrics.update(loss=rec + w * adv,
                     **self.gan_metrics(adv, d_weight, w, gan_on))
    return dict(grads), metrics, recon

  # --- outputs ------------------------------------------------------------
  def reconstruct(self, p_model, images):
    """(decode(encode(images)), codes or latents) with the eval-mode model."""
    codes = self.model.apply({"params": p_model}, images, method="encode")
    return self.model.apply({"params": p_model}, codes, method="decode"), codes

  def visualize(self, params, frozen, batch, rng):
    """{"reconstruction": uint8 (N, H, 2W, 3)}: each original with its
    reconstruction to its right, one cell of the grid per pair (2N
    interleaved images split pairs across the grid's rows whenever its
    column count was odd)."""
    del frozen, rng
    images = batch["image"]
    recon, _ = self._reconstruct(params["model"], images)
    recon = jnp.clip(recon, *self.value_range)
    pairs = jnp.concatenate([images, recon], axis=2)
    return {"reconstruction": self.grid_uint8(pairs)}
