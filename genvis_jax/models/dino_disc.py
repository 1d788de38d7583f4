"""Frozen-ViT feature discriminator (DINO ViT-S/16, as in VAR / Equivariant
tokenizer training) and DiffAug. (The tokenizer's semantic teacher, DINOv2-B/14,
is ``genvis_jax.models.dinov2``.)

``DinoDiscriminator``: images in [-1, 1] -> ImageNet normalisation -> 224 x 224
(random 224 crop with probability 1/2 when both sides are larger, else torch
'area' resize when the height is larger, torch bicubic otherwise; see
``preprocess``) -> frozen ViT (``vit``; weights from a local file) whose
token readouts ``x[:, 1:] + x[:, :1]`` after the embedding and after blocks
2, 5, 8, 11 feed five trainable heads (``heads_{i}``): spectral-normalised
Conv1d k1 -> BatchNormLocal -> LeakyReLU(0.2), a residual (Conv1d k9 circular
-> BN -> LReLU) scaled by 1/sqrt(2), and a Conv1d k1 to one logit per patch.
Output: (B, 5 * patches) logits. Only the heads train; the task keeps ``vit``
in a frozen group.

Pure-functional choices: BatchNormLocal normalises over groups of
``virtual_bs`` samples with no running statistics (as the official one), and
spectral norm runs ``power_iterations`` from a fixed vector each call instead
of carrying torch's ``u`` buffer (one iteration per call, kept between calls).
The estimate of sigma does not change the heads' logits or gradients: the two
k x C x C convolutions feed a BatchNormLocal, which cancels any positive scale
of their output (and their bias), so ``f(W / sigma(W)) = f(W)`` with sigma
linear in W, up to its eps (1e-6, as torch's, added to the variance of the
scaled output: it matters only for features of scale ~0.01 and below); the
last (C -> 1) kernel is a vector, whose norm one iteration finds exactly from
any start. (Equal to rounding for 1 and 50 iterations:
tests/test_discriminator.py.)

Per-GPU statistics: the official BatchNormLocal runs on each GPU's batch
(Equivariant recipe: 12 images per GPU, 192 over 16 GPUs), splitting it into
ceil(12 / 8) = 2 groups of 6. ``replica_batch`` (config ``disc.replica_batch``)
states that per-GPU batch: a call's images are cut into consecutive replicas
of ``replica_batch`` and each replica into groups exactly as the official code
would (``0``: the whole call is one replica). With the batch split over the
data axes, every statistics group stays on one device (no collective) when
the per-device batch is a multiple of the group size (e.g. of
``replica_batch``); otherwise XLA reduces across the devices a group spans.

``FrozenViT`` is the shared ViT (``models/layers/vit.py``) at timm / DINO
settings; ``convert/dino_vit.py`` maps a timm-style PyTorch state dict (e.g.
``dino_deitsmall16_pretrain.pth``) onto it. The discriminator resizes its
inputs to ``img_size``, so the ViT always runs at its table's grid (224 / 16
= 14); another grid is refused (``vit.Embed``), never resized.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import vit

# --- frozen ViT ----------------------------------------------------------------

class FrozenViT(nn.Module):
  """Normalised images (B, S, S, 3) -> token states; the shared ViT
  (``models/layers/vit.py``: fused qkv, eps 1e-6, LayerScale init 1e-5 when
  ``layerscale``, GELU tanh unless ``gelu_approximate=False``).

  Returns ``(readouts, patch_tokens)``: readouts, a list of ``x[:, 1:] +
  x[:, :1]`` (B, N, C) after the embedding and after each block in ``taps``
  (VAR / DINO-disc convention), and, when ``final``, ``norm(x)[:, 1:]``
  (B, N, C) after the last block (DINOv2 ``x_norm_patchtokens``; None
  otherwise). Only ``max(taps) + 1`` blocks run (and have parameters) when
  ``taps`` is set and ``final`` is False. Raises ``ValueError`` unless the
  input is square with ``patch_size`` dividing S (and ``vit.Embed``'s
  ``ValueError`` unless S / patch_size = ``pos_grid``).
  """
  patch_size: int = 16
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layerscale: bool = False
  gelu_approximate: bool = True
  pos_grid: int = 14               # rows of the stored position table
  taps: Sequence[int] = ()
  final: bool = False

  @nn.compact
  def __call__(self, x):
    s, p = x.shape[1], self.patch_size
    if s % p or x.shape[2] != s:
      raise ValueError(f"FrozenViT needs square inputs divisible by the patch "
                       f"size {p}, got {x.shape[1:3]}.")
    # The discriminator resizes its inputs to the table's grid (img_size).
    x = vit.Embed(self.dim, p, self.pos_grid, cls_init=layers.zeros,
                  name="embed")(x)
    last = self.depth if (self.final or not self.taps) else max(self.taps) + 1
    states = vit.Encoder(
        self.num_heads, int(self.dim * self.mlp_ratio),
        "gelu_tanh" if self.gelu_approximate else "gelu", 1e-6,
        1e-5 if self.layerscale else None, depth=last, name="encoder")(x)
    readout = lambda t: t[:, 1:] + t[:, :1]
    outs = [readout(states[0])] + [readout(states[i + 1]) for i in range(last)
                                    if i in self.taps]
    tokens = None
    if self.final:
      tokens = vit.layer_norm(1e-6, name="norm")(states[-1])[:, 1:]
    return outs, tokens


def preprocess(images, size: int, rng=None, random_crop: bool = True):
  """[-1, 1] NHWC -> ImageNet-normalised (B, size, size, 3), float32.

  As the official ``FrozenDINOSmallNoDrop.forward``: both sides > size and a
  key given: with probability 1/2 one random ``size`` crop for the whole call
  (torchvision ``RandomCrop`` on the batch tensor); else a resize to size x
  size, torch 'area' when the height is larger than ``size`` and bicubic
  otherwise (the official choice looks at the height only). Official training
  seeds every rank alike (Lightning ``seed_everything``), so its per-call
  coin and crop offsets agree across GPUs: one draw per call, as here.
  """
  x = images_lib.normalize_signed(images)
  b, h, w, c = x.shape
  if (h, w) == (size, size):
    return x
  resize = images_lib.resize_area if h > size else images_lib.resize_bicubic
  resized = resize(x, size, size)
  if rng is None or not random_crop or h <= size or w <= size:
    return resized
  k_coin, k_y, k_x = jax.random.split(rng, 3)
  top = jax.random.randint(k_y, (), 0, h - size + 1)
  left = jax.random.randint(k_x, (), 0, w - size + 1)
  crop = jax.lax.dynamic_slice(x, (0, top, left, 0), (b, size, size, c))
  return jnp.where(jax.random.uniform(k_coin) <= 0.5, crop, resized)


# --- trainable heads --------------------------------------------------------------

def spectral_normalize(kernel, iterations: int = 5):
  """kernel (k, in, out) / sigma_max of the torch layout (out, in * k).

  Power iteration from a fixed vector (stateless); u and v carry no gradient,
  as in torch's spectral norm.
  """
  w = jnp.transpose(kernel, (2, 1, 0)).reshape(kernel.shape[-1], -1)
  w32 = jax.lax.stop_gradient(w.astype(jnp.float32))
  u = jax.random.normal(jax.random.key(0), (w.shape[0],), jnp.float32)
  u = u / jnp.linalg.norm(u)
  v = None
  for _ in range(max(iterations, 1)):
    v = w32.T @ u
    v = v / (jnp.linalg.norm(v) + 1e-12)
    u = w32 @ v
    u = u / (jnp.linalg.norm(u) + 1e-12)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  sigma = u @ (w.astype(jnp.float32) @ v)
  return kernel / sigma.astype(kernel.dtype)


class SNConv1d(nn.Module):
  """Conv1d (B, L, C) -> (B, L, out) with optional spectral norm and circular
  padding ``k // 2`` (torch ``padding_mode='circular'``); PyTorch's
  ``nn.Conv1d`` default init, as the official heads keep."""
  features: int
  kernel_size: int = 1
  spectral: bool = True
  iterations: int = 5

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", layers.named(layers.torch_kernel_init,
                                               (None, "conv_in", "conv_out")),
                        (k, x.shape[-1], self.features))
    bias = self.param("bias", layers.named(layers.torch_bias_init, ("conv_out",)),
                      (self.features,), jnp.float32, k * x.shape[-1])
    if self.spectral:
      kernel = spectral_normalize(kernel, self.iterations)
    if k > 1:
      x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(x, kernel, (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias


class BatchNormLocal(nn.Module):
  """Normalises (B, L, C) over (samples of a virtual batch, L) per channel.

  The batch is cut into consecutive replicas of ``replica_batch`` samples
  (the per-GPU batch; ``0`` or a call with fewer samples: one replica), and
  each replica into ceil(replica / virtual_bs) equal groups, as the official
  ``BatchNormLocal`` does on each GPU. Returns float32 (B, L, C). Raises
  ``ConfigError`` when the batch does not split into replicas, or a replica
  into equal groups.
  """
  virtual_bs: int = 8
  eps: float = 1e-6
  replica_batch: int = 0

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    r = b if self.replica_batch <= 0 else min(self.replica_batch, b)
    if b % r:
      raise errors.ConfigError(
          f"BatchNormLocal: batch {b} does not split into "
          f"replicas of disc.replica_batch={self.replica_batch} "
          f"(the per-GPU batch); use a batch divisible by it.")
    g = -(-r // self.virtual_bs)
    if r % g:
      raise errors.ConfigError(
          f"BatchNormLocal: a replica of {r} samples does not "
          f"split into {g} equal virtual batches of <= "
          f"{self.virtual_bs} (the official view() would fail); "
          f"use a disc.replica_batch divisible by {g}.")
    x = layers.batch_norm_groups(x, b // r * g, self.eps)
    scale = self.param("scale", layers.named(layers.ones, ("norm",)), (c,))
    bias = self.param("bias", layers.named(layers.zeros, ("norm",)), (c,))
    return x * scale + bias


class DiscHead(nn.Module):
  """Token features (B, N, C) -> (B, N) logits."""
  kernel_size: int = 9
  virtual_bs: int = 8
  spectral: bool = True
  iterations: int = 5
  replica_batch: int = 0

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kw = dict(spectral=self.spectral, iterations=self.iterations)
    x = SNConv1d(c, 1, name="conv_in", **kw)(x)
    norm = lambda name: BatchNormLocal(self.virtual_bs,
                                       replica_batch=self.replica_batch,
                                       name=name)
    x = nn.leaky_relu(norm("norm_in")(x), 0.2)
    h = SNConv1d(c, self.kernel_size, name="res_conv", **kw)(x)
    h = nn.leaky_relu(norm("res_norm")(h), 0.2)
    x = (h + x) / np.sqrt(2.0)
    return SNConv1d(1, 1, name="conv_out", **kw)(x)[..., 0]


class DinoDiscriminator(nn.Module):
  """Images (B, H, W, 3) in [-1, 1] -> (B, (T + 1) * N) float32 logits, T =
  the ``key_depths`` below ``depth``, N = (img_size / patch_size)**2 patches.
  ``rng``: the random crop's key (None: resize only)."""
  img_size: int = 224
  patch_size: int = 16
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  key_depths: Sequence[int] = (2, 5, 8, 11)
  head_kernel: int = 9
  virtual_bs: int = 8
  replica_batch: int = 0           # per-GPU batch of BN statistics; 0: call
  spectral_norm: bool = True
  power_iterations: int = 5
  random_crop: bool = True

  @nn.compact
  def __call__(self, images, rng=None):
    x = preprocess(images, self.img_size, rng, self.random_crop)
    taps = tuple(d for d in self.key_depths if d < self.depth)
    feats, _ = FrozenViT(self.patch_size, self.dim, self.depth, self.num_heads,
                         pos_grid=self.img_size // self.patch_size, taps=taps,
                         name="vit")(x)
    logits = [DiscHead(self.head_kernel, self.virtual_bs, self.spectral_norm,
                       self.power_iterations, self.replica_batch,
                       name=f"heads_{i}")(f)
              for i, f in enumerate(feats)]
    return jnp.concatenate(logits, axis=1).astype(jnp.float32)


# --- DiffAug (translation, colour, cutout) ----------------------------------------

def diff_augment(x, rng, *, translation: float = 0.125, color: bool = True,
                 cutout: float = 0.2):
  """Differentiable augmentation of NHWC images in [-1, 1] (StyleGAN-T DiffAug
  with probability 1), independent draws per sample; 0 disables a part.
  ``translation`` / ``cutout``: fractions of the image side. (B, H, W, C) ->
  (B, H, W, C) float32 (colour jitter may leave [-1, 1])."""
  b, h, w, c = x.shape
  r = jax.random.uniform(rng, (7, b), jnp.float32)
  x = x.astype(jnp.float32)
  if translation:
    dh, dw = round(h * translation), round(w * translation)
    th = jnp.floor(r[0] * (2 * dh + 1)).astype(jnp.int32) - dh
    tw = jnp.floor(r[1] * (2 * dw + 1)).astype(jnp.int32) - dw
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.clip(jnp.arange(h)[None] + th[:, None] + 1, 0, h + 1)
    cols = jnp.clip(jnp.arange(w)[None] + tw[:, None] + 1, 0, w + 1)
    x = jnp.take_along_axis(pad, rows[:, :, None, None], axis=1)
    x = jnp.take_along_axis(x, cols[:, None, :, None], axis=2)
  if color:
    x = x + (r[2] - 0.5)[:, None, None, None]
    m = x.mean(axis=3, keepdims=True)
    x = (x - m) * (2 * r[3])[:, None, None, None] + m
    m = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - m) * (r[4] + 0.5)[:, None, None, None] + m
  if cutout:
    ch, cw = round(h * cutout), round(w * cutout)

    def hit(rand, size, cut):
      off = jnp.floor(rand * (size + (1 - cut % 2))).astype(jnp.int32)
      idx = jnp.clip(off[:, None] - cut // 2 + jnp.arange(cut)[None], 0, size - 1)
      return jnp.any(jax.nn.one_hot(idx, size, dtype=bool), axis=1)  # (B, size)

    if ch and cw:
      cut = hit(r[5], h, ch)[:, :, None] & hit(r[6], w, cw)[:, None, :]
      x = x * (~cut)[..., None].astype(x.dtype)
  return x


# config.disc keys read outside the module: the input size (example_inputs),
# the frozen ViT's weights file, DiffAugment (the eq_tokenizer task) and the
# discriminator's optimizer (the trainer).
_OTHER_KEYS = ("image_size", "image_width", "vit_path", "diffaug",
               "diffaug_cutout", "optimizer")


def build(cfg) -> DinoDiscriminator:
  """``config.disc`` -> DinoDiscriminator; unset fields take the class
  defaults (the official DINO ViT-S/16 discriminator). Raises ConfigError for
  an unknown key, an even ``head_kernel`` (the heads' 1-D convolutions
  keep the token count with an odd kernel only) or a ``num_heads`` that does
  not divide ``dim``."""
  model = DinoDiscriminator(**models.config_fields(
      cfg, DinoDiscriminator, ignore=_OTHER_KEYS))
  if model.head_kernel % 2 == 0:
    raise errors.ConfigError(f"config.disc.head_kernel={model.head_kernel} must be "
                      "odd (the official heads use 9).")
  layers.check_heads("config.disc.num_heads", model.num_heads, model.dim,
                     "config.disc.dim")
  return model


def example_inputs(cfg, batch_size: int = 1):
  """(images f32 zeros (batch_size, image_size, image_width or image_size,
  3),): the discriminator's input."""
  size = cfg.get("image_size", 256)
  return (jnp.zeros((batch_size, size, cfg.get("image_width", 0) or size, 3),
                    jnp.float32),)

