"""Equivariant column tokenizer training (``config.task = "eq_tokenizer"``);
losses and schedules in ``genvis_jax.train.tasks.eq``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.convert import clip_vision as convert_clip
from genvis_jax.convert import dino_vit
from genvis_jax.models import dino_disc as dino_lib
from genvis_jax.models import dinov2 as dinov2_lib
from genvis_jax.models import teachers as teachers_lib
from genvis_jax.models.eq_tokenizer import kl_loss, sample_posterior
from genvis_jax.train.tasks import join_groups
from genvis_jax.train.tasks.eq import (FROZEN_IN_STAGE2, freeze_top_level,
                                       nll_loss, teacher_inputs)
from genvis_jax.train.tasks.gan_tokenizer import GANTokenizerTask

# fold_in tag of the random DINO discriminator backbone (no vit_path).
_DINO_INIT_STREAM = 17


class EqTokenizerTask(GANTokenizerTask):
  """Batch: {"image": (B, H, W, 3) in [-1, 1]}. Groups "model", "disc"
  (+ "logvar" when ``loss.learn_logvar``). The GAN part (adaptive weight,
  always on, the discriminator step, the GAN-off path, the visuals) is
  ``GANTokenizerTask``'s; here: the NLL / KL / semantic terms and the DINO
  discriminator."""
  gan_weight_key = "disc_weight"
  adaptive = True   # official LPIPSWithDiscriminator: always adaptive

  def __init__(self, config):
    super().__init__(config)
    lo = config.loss
    self.is_dino = config.disc.name == "dino_disc"
    self.kl_weight = float(self.hparam("loss.kl_weight"))
    self.logvar_init = float(self.hparam("loss.logvar_init"))
    self.semantic_weight = float(self.hparam("loss.semantic_weight"))
    self.semantic_start = int(self.hparam("loss.semantic_start"))
    # DiffAug before the DINO discriminator (official: on, cutout 0.2).
    self.diffaug = bool(self.hparam("disc.diffaug")) if self.is_dino else False
    self.diffaug_cutout = (float(self.hparam("disc.diffaug_cutout"))
                           if self.diffaug else 0.0)
    if lo.learn_logvar:
      self.param_groups = self.param_groups + ("logvar",)
      self.generator_groups = self.generator_groups + ("logvar",)
    if self.use_gan:
      # Official (PyTorch Lightning 1.4, two optimizers): a whole training
      # step per optimizer, so the discriminator's step runs the generator
      # again after its update, with a fresh posterior sample.
      self.update_phases = (self.generator_groups, ("disc",))
    self.use_semantic = bool(self.semantic_weight) and bool(lo.teacher_path)
    if self.use_semantic and not self.model.semantic:
      raise errors.ConfigError(
          "config.loss.semantic_weight > 0 needs the semantic "
          "decoder: set config.model.semantic=True (or the weight "
          "to 0).")
    if self.semantic_weight and not lo.teacher_path:
      logging.warning("Semantic alignment is OFF: config.loss.teacher_path "
                      "(DINOv2 ViT-B/14 weights) is empty.")
    if self.is_dino and not config.disc.vit_path:
      logging.warning("DINO discriminator: config.disc.vit_path is empty, the "
                      "frozen ViT keeps its RANDOM initialisation (fine for "
                      "tests, not for real training).")
    self.teacher = None
    if self.use_semantic:
      # A teacher registry name, as FQGAN's config.teachers[i].name
      # ("dinov2:vit_b14"), or a DINOv2 variant alone ("vit_b14"): the
      # HF-layout DINOv2 with the timm (antialiased) position-table resize.
      name = str(lo.teacher.name)
      self.teacher, _ = teachers_lib.get_teacher(
          name if ":" in name else f"dinov2:{name}", output="patch_tokens")
    self._frozen = None

  # --- construction -------------------------------------------------------
  def disc_init(self, rng):
    # The DINO discriminator's ViT is frozen ("dino_vit" in frozen_params).
    p = super().disc_init(rng)
    return {k: v for k, v in p.items() if k != "vit"}

  def init_params(self, rng):
    out = dict(super().init_params(rng))
    if "logvar" in self.param_groups:
      out["logvar"] = {"logvar": jnp.full((), self.config.loss.logvar_init,
                                          jnp.float32)}
    return out

  def optimizer_configs(self):
    c = self.config
    out = {"model": (c.optimizer, "config.optimizer"),
           "disc": (c.disc.optimizer, "config.disc.optimizer")}
    if "logvar" in self.param_groups:
      out["logvar"] = (c.optimizer, "config.optimizer")
    return out

  def needs_init_from(self) -> str:
    if self.config.loss.stage2:
      return ("stage 2 (config.loss.stage2) trains the decoder side alone "
              "and keeps the encoder and quant layer init_from gives")
    return super().needs_init_from()

  def optimizers(self):
    opts = dict(super().optimizers())
    if self.config.loss.stage2:
      opts["model"] = freeze_top_level(opts["model"], FROZEN_IN_STAGE2)
    return opts

  def frozen_params(self):
    if self._frozen is not None:
      return self._frozen
    c, out = self.config, dict(super().frozen_params())
    if self.is_dino:
      init = lambda k: models.init_params(c.disc, k)["vit"]
      if c.disc.vit_path:
        out["dino_vit"] = dino_vit.load_dino_vit(
            c.disc.vit_path, jax.eval_shape(init, jax.random.key(0)),
            zero_k_bias=True)
      else:
        # Random stand-in weights (tests, demos): a stream of the run's
        # seed of its own, not another seed's (seed + k would be seed k's).
        out["dino_vit"] = jax.jit(init)(
            jax.random.fold_in(jax.random.key(c.seed), _DINO_INIT_STREAM))
    if self.use_semantic:
      out["teacher"] = convert_clip.load_teacher_params(
          c.loss.teacher_path, setting="config.loss.teacher_path")
    self._frozen = out
    return out

  def frozen_axes(self):
    """The DINO discriminator's ViT and the semantic teacher (DINOv2
    ViT-B/14s, 86M parameters each) split as trained weights are."""
    c, axes = self.config, dict(super().frozen_axes())
    key = jax.random.key(0)
    if self.is_dino:
      axes["dino_vit"] = jax.eval_shape(
          lambda k: models.init_params(c.disc, k, boxed=True)["vit"], key)
    if self.use_semantic:
      x = dinov2_lib.example_inputs(self.teacher, 1,
                                    c.loss.teacher.img_size)
      axes["teacher"] = jax.eval_shape(
          lambda k: self.teacher.init(k, *x)["params"], key)
    return axes

  # --- pieces ---------------------------------------------------------------
  def split_rng(self, rng):
    return tuple(jax.random.split(rng, 3))

  def gan_metrics(self, adv, d_weight, w, gan_on):
    del w
    return {"g_loss": adv, "d_weight": d_weight, "disc_factor": gan_on}

  def disc_logits(self, p_disc, frozen, images, rng):
    if not self.is_dino:
      return self.disc.apply({"params": p_disc}, images)
    k_aug, k_crop = jax.random.split(rng)
    x = images
    if self.diffaug:
      x = dino_lib.diff_augment(x, k_aug, cutout=self.diffaug_cutout)
    vit = jax.lax.stop_gradient(frozen["dino_vit"])
    return self.disc.apply({"params": join_groups(p_disc, {"vit": vit})}, x,
                           k_crop)

  def _semantic_loss(self, frozen, images, sem):
    size = self.config.loss.teacher.img_size
    feats = self.teacher.apply({"params": jax.lax.stop_gradient(frozen["teacher"])},
                               teacher_inputs(images, size))
    feats = jax.lax.stop_gradient(feats)
    b, h, w, c = sem.shape
    if feats.shape != (b, h * w, c):
      raise errors.ConfigError(
          f"Teacher patch tokens {feats.shape} do not match the "
          f"semantic decoder output {sem.shape}: set "
          f"config.loss.teacher.img_size so that the patch grid "
          f"is {h}x{w} (official: 224 * resolution // 256) and use "
          f"a teacher of width {c}.")
    return jnp.sum(jnp.square(sem.reshape(b, h * w, c) - feats)) / b

  def _forward(self, p_model, images, rng, train=True):
    k_post, k_drop = jax.random.split(rng)
    apply = lambda *a, **k: self.model.apply({"params": p_model}, *a, **k)
    mean = apply(images, train, method="encode", rngs={"dropout": k_drop})
    if self.config.loss.stage2:
      mean = jax.lax.stop_gradient(mean)
    z = sample_posterior(mean, k_post, self.model.std)
    recon, sem = apply(z, train, method="decode_all", rngs={"dropout": k_drop})
    return recon, sem, jnp.mean(kl_loss(mean))   # fp32 also in bf16

  def generator_terms(self, gen, p_disc, frozen, images, rng, step):
    """rec = nll + KL + semantic (KL and the semantic map do not depend on the
    decoder's last layer, so the adaptive weight sees the NLL's gradient)."""
    k_fwd, k_disc = jax.random.split(rng)
    recon, sem, kl = self._forward(gen["model"], images, k_fwd)
    perc = None
    metrics = {}
    if self.use_lpips:
      perc = self.perceptual(frozen, images, recon)
      metrics["lpips"] = jnp.mean(perc)
    logvar = gen["logvar"]["logvar"] if "logvar" in gen else jnp.float32(
        self.logvar_init)
    nll, rec = nll_loss(images, recon, logvar, perc, self.perceptual_weight)
    other = self.kl_weight * kl
    if self.use_semantic:
      sem_loss = self._semantic_loss(frozen, images, sem)
      factor = jnp.where(step >= self.semantic_start, self.semantic_weight,
                         0.0)
      other = other + factor * sem_loss
      metrics.update(semantic_loss=sem_loss, semantic_factor=factor)
    adv = self.adversarial(p_disc, frozen, recon, k_disc)
    metrics.update(nll_loss=nll, kl_loss=kl, rec_loss=jnp.mean(rec),
                   l1=jnp.mean(jnp.abs(images - recon)), logvar=logvar)
    return (nll + other, adv), (recon, metrics)


# --- generator ----------------------------------------------------------------------


TASK = EqTokenizerTask
