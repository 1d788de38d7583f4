"""PatchGAN discriminator (taming-transformers ``NLayerDiscriminator``), NHWC.

Layout for ``n_layers=3, ndf=64`` (output is a grid of real/fake logits):
  conv4x4/2 (3 -> 64, bias) LeakyReLU(0.2)
  conv4x4/2 (64 -> 128) norm LeakyReLU
  conv4x4/2 (128 -> 256) norm LeakyReLU
  conv4x4/1 (256 -> 512) norm LeakyReLU
  conv4x4/1 (512 -> 1, bias)
All convs pad 1 on every side (torch ``padding=1``), so a 256px input gives a
30x30 logit map. Convs followed by a norm have no bias, as in taming. Conv
weights ~ N(0, 0.02) (taming's ``weights_init``).

Normalisation (``norm``):
  "batch"  taming / FQGAN's ``nn.BatchNorm2d`` as it is used in training:
           always in train mode, so every call normalises with batch
           statistics, and under DDP (no SyncBN) each GPU's images form their
           own batch. Here: stateless, over groups of ``group_size``
           consecutive images of the call (FQGAN: 32 = 256 images / 8 GPUs),
           per channel over (group, H, W), biased variance, eps 1e-5, affine
           scale ~ N(1, 0.02) and bias 0 (the official ``_init_weights``). The
           running statistics torch also keeps are never read in training and
           are not modelled. Real images, fake images and the generator's
           fakes are separate calls (the tasks do so), each with its own
           statistics, as in the official loss. A call with fewer than
           ``group_size`` images (parameter init, small local runs) is one
           group (what one GPU holding the whole batch computes);
           ``group_size <= 0`` always takes the whole call as one group. A
           batch that does not split into groups of ``group_size`` raises a
           ``ConfigError`` (a ValueError; the official per-GPU split requires
           the global batch to divide by the number of GPUs).
           Sharding: groups are consecutive images, so each stays on one
           device (no collective) when the per-device batch is a multiple of
           ``group_size``; otherwise XLA all-reduces over the devices a group
           spans, with the same values.
  "group"  GroupNorm (``num_groups`` groups, eps 1e-5): per-image statistics.
  "none"   no normalisation (the convs keep their bias).
The norm parameters are ``norm_{n}/{scale, bias}`` for every norm, so
checkpoints of either norm have the same tree.

Input images are in whatever range the tokenizer trains in (the task feeds real
and reconstructed images in the same range); nothing is rescaled here.
GAN losses live in ``genvis_jax/train/losses.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype

_PAD1 = ((1, 1), (1, 1))
_NORMS = ("batch", "group", "none")


def _torch_bn_weight_init(key, shape, dtype=jnp.float32):
  """The official discriminator's BatchNorm weight init: N(1, 0.02)."""
  return (1.0 + 0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class GroupBatchNorm(nn.Module):
  """Train-mode BatchNorm over groups of ``group_size`` consecutive images.

  (B, H, W, C) -> same shape in ``dtype``; statistics in float32 per (group,
  channel) over (images of the group, H, W), biased variance. See the module
  docstring. Raises ``ConfigError`` when the batch does not split into groups.
  """
  group_size: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    g = b if self.group_size <= 0 else min(self.group_size, b)
    if b % g:
      raise errors.ConfigError(
          f"PatchGAN norm='batch': a batch of {b} images does not split into "
          f"groups of disc.group_size={self.group_size} (the per-GPU batch of "
          f"the official BatchNorm); use a batch divisible by it or set "
          f"disc.group_size to a divisor of {b} (0 = the whole batch).")
    y = layers.batch_norm_groups(x, b // g, self.epsilon)
    scale = self.param("scale", layers.named(_torch_bn_weight_init, ("norm",)),
                       (c,), self.param_dtype)
    bias = self.param("bias", layers.named(layers.zeros, ("norm",)), (c,),
                      self.param_dtype)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """(B, H, W, C) images -> (B, H', W', 1) patch logits (float32); H' = H/8 - 2
  for 3 layers (256 -> 30). Raises ``ConfigError`` for a ``norm`` outside
  ("batch", "group", "none") or a batch ``GroupBatchNorm`` cannot group."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  num_groups: int = 32
  group_size: int = 32             # images per BatchNorm group (norm="batch")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.norm not in _NORMS:
      raise errors.ConfigError(
          f"Unknown discriminator norm {self.norm!r}; choose one "
          f"of {_NORMS}.")
    # taming's weights_init: N(0, 0.02) kernels; the biases (first and last
    # conv) keep PyTorch's default.
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=layers.default_kernel_init,
              bias_init=layers.torch_bias_init, padding=_PAD1)
    use_norm = self.norm != "none"
    x = layers.conv(self.ndf, 4, strides=2, name="conv_0", **kw)(x)
    x = nn.leaky_relu(x, 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      x = layers.conv(self.ndf * mult, 4, strides=stride, use_bias=not use_norm,
                      name=f"conv_{n}", **kw)(x)
      if self.norm == "group":
        x = layers.group_norm(min(self.num_groups, self.ndf * mult), 1e-5,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"norm_{n}")(x)
      elif self.norm == "batch":
        x = GroupBatchNorm(self.group_size, 1e-5, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"norm_{n}")(x)
      x = nn.leaky_relu(x, 0.2)
    x = layers.conv(1, 4, name=f"conv_{self.n_layers + 1}", **kw)(x)
    return x.astype(jnp.float32)


def build(cfg) -> NLayerDiscriminator:
  """``config.disc`` -> NLayerDiscriminator; unset fields take the class
  defaults (taming's 3-layer, 64-filter PatchGAN). ``image_size``,
  ``image_width`` and ``in_channels`` are read by ``example_inputs``,
  ``optimizer`` by the trainer. Raises ConfigError for an unknown key, or
  for ``n_layers`` that leave no output pixel for the images."""
  model = NLayerDiscriminator(**models.config_fields(
      cfg, NLayerDiscriminator,
      ignore=("image_size", "image_width", "in_channels", "optimizer")))
  size = min(cfg.get("image_size", 256), cfg.get("image_width", 0) or 256)
  if _output_size(size, model.n_layers) < 1:
    most = max((n for n in range(model.n_layers) if _output_size(size, n) >= 1),
               default=0)
    raise errors.ConfigError(
        f"config.disc.n_layers={model.n_layers} leaves the PatchGAN no output "
        f"pixel on {size}-px images (each layer but the last halves the "
        f"size); use at most {most}.")
  return model


def _output_size(size: int, n_layers: int) -> int:
  """Side of the logit map: 4x4 convolutions with padding 1, stride 2 for
  the first ``n_layers``, then stride 1 twice."""
  for _ in range(n_layers):
    size = (size + 2 - 4) // 2 + 1
  return size - 2


def example_inputs(cfg, batch_size: int = 1):
  """(images f32 zeros (batch_size, image_size, image_width or image_size,
  in_channels),): the argument of ``NLayerDiscriminator.__call__``."""
  size = cfg.get("image_size", 256)
  return (jnp.zeros((batch_size, size, cfg.get("image_width", 0) or size,
                     cfg.get("in_channels", 3)), jnp.float32),)

