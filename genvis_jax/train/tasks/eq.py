"""Equivariant image modeling: tokenizer ("eq_tokenizer") and generator
("eq_generator") training tasks. Pixels in [-1, 1].

eq_tokenizer (official ``LPIPSWithDiscriminator``), per image summed, batch
averaged:
  nll = sum((|x - x_rec| + w_p * LPIPS(x, x_rec)) / exp(logvar) + logvar)
  loss = nll + w_kl * 0.5 * sum(mu^2) + d_w * [step >= disc_start] * g_loss
         + [step >= semantic_start] * w_sem * sum((sem(x_rec) - teacher(x))^2)
  d_w = disc_weight * |grad nll| / (|grad g_loss| + 1e-4) at decoder/conv_out,
  g_loss = -mean(D(aug(x_rec))), D hinge-trained on aug(x) vs aug(sg[x_rec]).
  The discriminator is ``config.disc.name``: "patchgan" or "dino_disc" (frozen
  ViT in the frozen group "dino_vit", DiffAug on its inputs). Stage 2
  (``loss.stage2``) freezes the encoder and quant layer.

eq_generator: latents x = tokenizer posterior sample * latents.scale (images
encoded on the fly by a frozen tokenizer from ``tokenizer.checkpoint``, or
``batch["latents"]`` = pre-computed posterior means); per token
``diffusion_batch_mul`` draws of t ~ U(t_eps, 1) and eps, x_t = t eps + (1-t) x,
MSE of the head's velocity against eps - x; label dropout to the null class;
RoPE position shift ~ randint(0, shift_num) per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import logging

from genvis_jax import models
from genvis_jax.models import dino_disc as dino_lib
from genvis_jax.models import dinov2 as dinov2_lib
from genvis_jax.models.eq_tokenizer import sample_posterior
from genvis_jax.models.layers import drop_labels
from genvis_jax.train import optimizers as opt_lib
from genvis_jax.train.tasks import (Task, join_groups, register,
                                    tokenizer_value_range)
from genvis_jax.train.tasks.gan_tokenizer import GANTokenizerTask

FROZEN_IN_STAGE2 = ("encoder", "quant_layer")


# --- pure pieces ------------------------------------------------------------------

def step_decay_schedule(lr: float, warmup: int, every: int, rate: float):
  """Official ``LambdaWarmUpDecayScheduler``: linear warm-up over ``warmup``
  steps (reaching (warmup-1)/warmup), then x ``rate`` every ``every`` steps."""
  def schedule(n):
    n = jnp.asarray(n, jnp.float32)
    if warmup <= 0:
      return lr * rate ** jnp.floor(n / every)
    k = jnp.floor(jnp.maximum(n - warmup, 0.0) / every)
    after = (warmup - 1) / warmup * rate ** k
    return lr * jnp.where(n < warmup, n / warmup, after)
  return schedule


def make_optimizer(opt_config, train_config):
  """``opt_lib.make_optimizer`` plus the ``step_decay`` schedule (Adam only)."""
  if opt_config.schedule != "step_decay":
    return opt_lib.make_optimizer(opt_config, train_config)
  sched = step_decay_schedule(opt_config.lr, int(opt_config.warmup_steps),
                              int(opt_config.decay_every),
                              float(opt_config.decay_rate))
  chain = []
  if train_config.grad_clip and train_config.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_config.grad_clip))
  chain.append(optax.adamw(sched, b1=opt_config.b1, b2=opt_config.b2,
                           eps=opt_config.eps,
                           weight_decay=opt_config.get("weight_decay", 0.0)))
  return optax.chain(*chain)


def freeze_top_level(opt, frozen: tuple[str, ...]):
  """Zero updates for the top-level parameter subtrees named in ``frozen``."""
  label = lambda params: {k: "frozen" if k in frozen else "train" for k in params}
  return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()},
                               label)


def nll_loss(x, recon, logvar, perceptual=None, perceptual_weight=1.0):
  """Per-pixel |x - recon| (+ w * per-image LPIPS) over exp(logvar) + logvar,
  summed per image, averaged over the batch."""
  rec = jnp.abs(x.astype(jnp.float32) - recon.astype(jnp.float32))
  if perceptual is not None:
    rec = rec + perceptual_weight * perceptual[:, None, None, None]
  nll = rec / jnp.exp(logvar) + logvar
  return jnp.sum(nll) / x.shape[0], rec


def flow_targets(latents, rng, mul: int, t_eps: float = 1e-5):
  """Rectified-flow draws: latents (B, L, C) -> noise (B, M, L, C), t (B, M, L)
  with t ~ U(t_eps, 1) per token draw; target velocity is noise - latents."""
  b, n, c = latents.shape
  k_n, k_t = jax.random.split(rng)
  noise = jax.random.normal(k_n, (b, mul, n, c), jnp.float32)
  t = jax.random.uniform(k_t, (b, mul, n), jnp.float32) * (1 - t_eps) + t_eps
  return noise, t


def flow_loss(velocity, noise, latents):
  """mean((velocity - (noise - latents))^2) over every token draw and channel."""
  target = noise - latents[:, None].astype(jnp.float32)
  return jnp.mean(jnp.square(velocity - target))


def teacher_inputs(images, size: int):
  """Official ``preprocess_raw_image(x, "dinov2-vit-b")``: [-1, 1] -> [0, 1] ->
  ImageNet mean/std -> torch bicubic resize (no antialias) to size x size."""
  mean = jnp.asarray(dinov2_lib.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(dinov2_lib.IMAGENET_STD, jnp.float32)
  x = ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std
  mh = jnp.asarray(dinov2_lib.bicubic_matrix(x.shape[1], size), jnp.float32)
  mw = jnp.asarray(dinov2_lib.bicubic_matrix(x.shape[2], size), jnp.float32)
  return jnp.einsum("ih,bhwc,jw->bijc", mh, x, mw,
                    precision=jax.lax.Precision.HIGHEST)


# --- tokenizer ----------------------------------------------------------------------

@register("eq_tokenizer")
class EqTokenizerTask(GANTokenizerTask):
  """Batch: {"image": (B, H, W, 3) in [-1, 1]}. Groups "model", "disc"
  (+ "logvar" when ``loss.learn_logvar``). The GAN part (adaptive weight,
  always on, the discriminator step, the GAN-off path, the visuals) is
  ``GANTokenizerTask``'s; here: the NLL / KL / semantic terms and the DINO
  discriminator."""
  gan_weight_key = "disc_weight"

  def __init__(self, config):
    super().__init__(config)
    lo = config.loss
    self.adaptive = True   # official LPIPSWithDiscriminator: always adaptive
    self.is_dino = config.disc.name == "dino_disc"
    if lo.learn_logvar:
      self.param_groups = self.param_groups + ("logvar",)
      self.generator_groups = self.generator_groups + ("logvar",)
    self.use_semantic = bool(lo.semantic_weight) and bool(lo.teacher_path)
    if self.use_semantic and not self.model.semantic:
      raise ValueError("config.loss.semantic_weight > 0 needs the semantic "
                       "decoder: set config.model.semantic=True (or the weight "
                       "to 0).")
    if lo.semantic_weight and not lo.teacher_path:
      logging.warning("Semantic alignment is OFF: config.loss.teacher_path "
                      "(DINOv2 ViT-B/14 weights) is empty.")
    if self.is_dino and not config.disc.vit_path:
      logging.warning("DINO discriminator: config.disc.vit_path is empty, the "
                      "frozen ViT keeps its RANDOM initialisation (fine for "
                      "tests, not for real training).")
    self.teacher = None
    if self.use_semantic:
      # HF-layout DINOv2 with the timm (antialiased) position-table resize.
      self.teacher, _ = dinov2_lib.teacher(lo.teacher.name,
                                           output="patch_tokens")
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

  def optimizers(self):
    c = self.config
    model_opt = make_optimizer(c.optimizer, c.train)
    if c.loss.stage2:
      model_opt = freeze_top_level(model_opt, FROZEN_IN_STAGE2)
    opts = {"model": model_opt,
            "disc": make_optimizer(c.disc.optimizer, c.train)}
    if "logvar" in self.param_groups:
      opts["logvar"] = make_optimizer(c.optimizer, c.train)
    return opts

  def frozen_params(self):
    if self._frozen is not None:
      return self._frozen
    c, out = self.config, dict(super().frozen_params())
    if self.is_dino:
      if c.disc.vit_path:
        out["dino_vit"] = dino_lib.load_vit_params(c.disc.vit_path,
                                                   zero_k_bias=True)
      else:
        init = lambda k: models.init_params(c.disc, k)["vit"]
        out["dino_vit"] = jax.jit(init)(jax.random.key(c.seed + 17))
    if self.use_semantic:
      from genvis_jax.models import teachers  # pylint: disable=import-outside-toplevel
      out["teacher"] = teachers.load_teacher_params(c.loss.teacher_path)
    self._frozen = out
    return out

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
    if self.config.disc.get("diffaug", True):
      x = dino_lib.diff_augment(x, k_aug,
                                cutout=self.config.disc.get("diffaug_cutout", 0.2))
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
      raise ValueError(f"Teacher patch tokens {feats.shape} do not match the "
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
    kl = jnp.mean(0.5 * jnp.sum(jnp.square(mean), axis=(1, 2)))
    return recon, sem, kl

  def generator_terms(self, gen, p_disc, frozen, images, rng, step):
    """rec = nll + KL + semantic (KL and the semantic map do not depend on the
    decoder's last layer, so the adaptive weight sees the NLL's gradient)."""
    lo = self.config.loss
    k_fwd, k_disc = jax.random.split(rng)
    recon, sem, kl = self._forward(gen["model"], images, k_fwd)
    perc = None
    metrics = {}
    if self.use_lpips:
      perc = self.perceptual(frozen, images, recon)
      metrics["lpips"] = jnp.mean(perc)
    logvar = gen["logvar"]["logvar"] if "logvar" in gen else jnp.float32(
        lo.logvar_init)
    nll, rec = nll_loss(images, recon, logvar, perc, lo.perceptual_weight)
    other = lo.kl_weight * kl
    if self.use_semantic:
      sem_loss = self._semantic_loss(frozen, images, sem)
      factor = jnp.where(step >= lo.semantic_start, lo.semantic_weight, 0.0)
      other = other + factor * sem_loss
      metrics.update(semantic_loss=sem_loss, semantic_factor=factor)
    adv = self.adversarial(p_disc, frozen, recon, k_disc)
    metrics.update(nll_loss=nll, kl_loss=kl, rec_loss=jnp.mean(rec),
                   l1=jnp.mean(jnp.abs(images - recon)), logvar=logvar)
    return (nll + other, adv), (recon, metrics)


# --- generator ----------------------------------------------------------------------

@register("eq_generator")
class EqGeneratorTask(Task):
  """Batch: {"image": (B, H, W, 3) in [-1, 1] or "latents": (B, L, C) posterior
  means, "label": (B,)}. One group "model"; metrics loss / shift."""

  def __init__(self, config):
    super().__init__(config)
    self.model = models.build(config.model)
    self.tokenizer = models.build(config.tokenizer.model)
    # Images are encoded on the fly (and samples decoded) by this tokenizer.
    self.value_range = tokenizer_value_range(config, config.tokenizer.model,
                                             ("data", "tokenizer"))
    self.label_dropout = float(config.train.get("label_dropout", 0.1))
    self._frozen = None
    # One jit for the sample grids' decode: compiled once per width.
    self._decode = jax.jit(self._latents_to_images)

  def init_params(self, rng):
    return {"model": models.init_params(self.config.model, rng, boxed=True)}

  def optimizers(self):
    return {"model": make_optimizer(self.config.optimizer, self.config.train)}

  def frozen_params(self):
    if self._frozen is None:
      self._frozen = {}
      path = self.config.tokenizer.checkpoint
      if path:
        from genvis_jax.core import checkpoint as ckpt_lib
        abstract = jax.eval_shape(
            lambda k: models.init_params(self.config.tokenizer.model, k),
            jax.random.key(0))
        self._frozen["tokenizer"] = ckpt_lib.load_params(
            path, abstract, setting="--config.tokenizer.checkpoint")
    return self._frozen

  def encode(self, frozen, batch):
    """Posterior means (B, L, C) from ``batch`` (pre-computed or encoded by
    the frozen tokenizer ``frozen["tokenizer"]``)."""
    if "latents" in batch:
      return batch["latents"].astype(jnp.float32)
    if "tokenizer" not in frozen:
      raise ValueError(
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
    shift = jax.random.randint(k_shift, (), 0, max(int(f.shift_num), 1))

    def loss_fn(p):
      v, _ = self.model.apply({"params": p}, x, labels, noise, t, train=True,
                              shift=shift, rngs={"dropout": k_drop})
      return flow_loss(v, noise, x)

    loss, g = jax.value_and_grad(loss_fn)(params["model"])
    return {"model": g}, {"loss": loss, "shift": shift.astype(jnp.float32),
                          "latent_std": jnp.std(x)}

  def _latents_to_images(self, tokenizer_params, latents):
    from genvis_jax.sample import eq as eq_sample
    return eq_sample.latents_to_images(self.tokenizer, tokenizer_params, latents,
                                       self.config.latents.scale)

  def visualize(self, params, frozen, batch, rng):
    """Samples at the training width and ``sample.wide_columns`` (if set)."""
    if "tokenizer" not in frozen:
      return {}
    from genvis_jax.sample import eq as eq_sample
    from genvis_jax.core.metrics import to_uint8  # lazy: imports TensorFlow
    sp, n = self.config.sample, min(8, batch["label"].shape[0])
    labels = batch["label"][:n]
    width = (batch["latents"].shape[1] if "latents" in batch
             else batch["image"].shape[2] // self.tokenizer.token_width)
    out = {}
    for name, cols in (("samples", width),
                       ("samples_wide", int(sp.get("wide_columns", 0)))):
      if cols:
        lat = eq_sample.sample(self.model, params["model"], labels, rng,
                               num_columns=cols, cfg=sp.cfg,
                               num_steps=sp.num_steps)
        img = self._decode(frozen["tokenizer"], lat)
        out[name] = to_uint8(jax.device_get(img), self.value_range)
    return out
