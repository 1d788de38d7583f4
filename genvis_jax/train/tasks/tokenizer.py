"""Image-tokenizer training: reconstruction + LPIPS + VQ + PatchGAN (taming-style).

The GAN part (groups "model" and "disc", the adaptive weight, the
discriminator step, the GAN-off path and the reconstruction grids) is
``GANTokenizerTask``'s (tasks/gan_tokenizer.py); this task adds the loss terms
of MaskGIT VQGAN / LlamaGen / FQGAN tokenizers:
rec = reconstruction_weight * l1|l2 + quantizer_weight * VQ loss
(+ ``extra_terms`` of a subclass) + perceptual_weight * mean LPIPS.
``config.loss.gan_weight`` scales the adversarial term (adaptive when
``config.loss.adaptive_gan_weight``), which switches on at
``config.loss.disc_start``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax.models import quantizers
from genvis_jax.train.tasks.gan_tokenizer import GANTokenizerTask

def reconstruction_loss(kind: str, x, y):
  """Mean pixel loss of ``x`` against ``y`` (same shapes, any float dtype)
  -> scalar: "l1" (MaskGIT) or "l2" (LlamaGen / FQGAN),
  ``config.loss.reconstruction``. Raises ``ConfigError`` for another."""
  if kind == "l1":
    return jnp.mean(jnp.abs(x - y))
  if kind == "l2":
    return jnp.mean(jnp.square(x - y))
  raise errors.ConfigError(
      f"Unknown config.loss.reconstruction {kind!r}; use l1 | l2.")


class TokenizerTask(GANTokenizerTask):
  """Batch: {"image": (B, H, W, 3) in ``value_range``, ...}."""

  def __init__(self, config):
    super().__init__(config)
    self.reconstruction = str(self.hparam("loss.reconstruction"))
    self.reconstruction_weight = float(self.hparam("loss.reconstruction_weight"))
    self.quantizer_weight = float(self.hparam("loss.quantizer_weight"))

  def optimizer_configs(self):
    c = self.config
    return {"model": (c.optimizer, "config.optimizer"),
            "disc": (c.disc.optimizer, "config.disc.optimizer")}

  # --- losses -------------------------------------------------------------
  def forward_kwargs(self) -> dict:
    """Extra keyword arguments of the model's training forward."""
    return {}

  def extra_terms(self, total, frozen, images, aux, metrics):
    """``total`` plus a subclass's terms (logged into ``metrics``)."""
    del frozen, images, aux, metrics
    return total

  def generator_terms(self, gen, p_disc, frozen, images, rng, step):
    del step
    recon, aux = self.model.apply({"params": gen["model"]}, images, train=True,
                                  rngs={"dropout": rng}, **self.forward_kwargs())
    rec = reconstruction_loss(self.reconstruction, recon, images)
    total = (self.reconstruction_weight * rec
             + self.quantizer_weight * aux["quantizer_loss"])
    metrics = {"rec_loss": rec}
    total = self.extra_terms(total, frozen, images, aux, metrics)
    if self.use_lpips:
      perc = jnp.mean(self.perceptual(frozen, recon, images))
      total = total + self.perceptual_weight * perc
      metrics["lpips"] = perc
    adv = self.adversarial(p_disc, frozen, recon, None)
    # Scalars, and the code histograms the step turns into the whole batch's
    # usage (``step.usage_of_batch``).
    scalars = {k: v for k, v in aux.items() if isinstance(v, jax.Array) and (
        v.ndim == 0 or k.startswith(quantizers.COUNTS))}
    return (total, adv), (recon, {**metrics, **scalars, "gen_loss": total})


TASK = TokenizerTask
