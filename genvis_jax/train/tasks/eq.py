"""Equivariant image modeling: the losses of the tokenizer
(``tasks/eq_tokenizer.py``) and generator (``tasks/eq_generator.py``) tasks.
Pixels in [-1, 1].

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

Two differences from the official training are kept: the adaptive weight
d_w is computed from the whole batch's gradients (each micro-batch's with
``train.micro_batches`` > 1, so that setting changes it), where the official
``torch.autograd.grad`` (outside DDP's all-reduce) computes it from each GPU's
12 images and DDP averages grad nll_i + d_w_i grad g_loss_i; and LPIPS runs
without the Dropout(0.5) of its linear layers, which the official loss
module, in train mode, applies (zero-mean noise on the perceptual term).
The discriminator steps on a second forward pass of the updated generator,
as the official PyTorch Lightning loop does (``Task.update_phases``).

eq_generator: latents x = tokenizer posterior sample * latents.scale (images
encoded on the fly by a frozen tokenizer from ``tokenizer.checkpoint``, or
``batch["latents"]`` = pre-computed posterior means); per token
``diffusion_batch_mul`` draws of t ~ U(t_eps, 1) and eps, x_t = t eps + (1-t) x,
MSE of the head's velocity against eps - x; label dropout to the null class;
RoPE position shift ~ randint(0, shift_num), one per ``shift_group`` images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from genvis_jax.models.layers import images as images_lib


FROZEN_IN_STAGE2 = ("encoder", "quant_layer")


# --- pure pieces ------------------------------------------------------------------

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


def rope_shifts(rng, batch: int, shift_num: int, group: int):
  """RoPE position shifts (batch,) int32 in [0, shift_num), equal within each
  run of ``group`` consecutive images.

  The official ``equ_modeling.py`` draws ``torch.randint(0, shift_num, (1,))``
  in every forward pass, i.e. one shift per GPU batch (64 images at the
  paper's 2048 on 32 GPUs); ``group`` = that per-GPU batch keeps an update's
  mix of shifts when the global batch is one array here.
  """
  draws = jax.random.randint(rng, (-(-batch // group),), 0, max(shift_num, 1))
  return jnp.repeat(draws, group)[:batch]


def flow_loss(velocity, noise, latents):
  """mean((velocity - (noise - latents))^2) over every token draw and channel."""
  target = noise - latents[:, None].astype(jnp.float32)
  return jnp.mean(jnp.square(velocity - target))


def teacher_inputs(images, size: int):
  """Official ``preprocess_raw_image(x, "dinov2-vit-b")``: [-1, 1] -> [0, 1] ->
  ImageNet mean/std -> torch bicubic resize (no antialias) to size x size."""
  return images_lib.resize_bicubic(images_lib.normalize_signed(images), size,
                                   size)


# --- tokenizer ----------------------------------------------------------------------
