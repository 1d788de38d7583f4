"""PatchGAN discriminator (taming-transformers ``NLayerDiscriminator``), NHWC.

Layout for ``n_layers=3, ndf=64`` (output is a grid of real/fake logits):
  conv4x4/2 (3 -> 64, bias) LeakyReLU(0.2)
  conv4x4/2 (64 -> 128) norm LeakyReLU
  conv4x4/2 (128 -> 256) norm LeakyReLU
  conv4x4/1 (256 -> 512) norm LeakyReLU
  conv4x4/1 (512 -> 1, bias)
All convs pad 1 on every side (torch ``padding=1``), so a 256px input gives a
30x30 logit map.

Normalisation: taming uses BatchNorm, which carries running statistics (mutable
state) and couples samples within a batch. We keep the model pure-functional with
``norm="group"`` (GroupNorm, 32 groups; default) or ``norm="none"``. Convs
followed by a norm have no bias, as in taming. Conv weights ~ N(0, 0.02)
(taming's ``weights_init``).

Input images are in whatever range the tokenizer trains in (the task feeds real
and reconstructed images in the same range); nothing is rescaled here.
GAN losses live in ``genvis_jax/train/losses.py``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.models import layers

_PAD1 = ((1, 1), (1, 1))
_NORMS = ("group", "none")


class NLayerDiscriminator(nn.Module):
  """(B, H, W, C) images -> (B, H', W', 1) patch logits (float32)."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = "group"
  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.norm not in _NORMS:
      raise ValueError(f"Unknown discriminator norm {self.norm!r}; choose one "
                       f"of {_NORMS} (BatchNorm is not supported: it needs "
                       f"mutable batch statistics).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.normal(0.02), padding=_PAD1)
    use_norm = self.norm == "group"
    x = layers.conv(self.ndf, 4, strides=2, name="conv_0", **kw)(x)
    x = nn.leaky_relu(x, 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      x = layers.conv(self.ndf * mult, 4, strides=stride, use_bias=not use_norm,
                      name=f"conv_{n}", **kw)(x)
      if use_norm:
        x = layers.group_norm(min(self.num_groups, self.ndf * mult), 1e-5,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"norm_{n}")(x)
      x = nn.leaky_relu(x, 0.2)
    x = layers.conv(1, 4, name=f"conv_{self.n_layers + 1}", **kw)(x)
    return x.astype(jnp.float32)


def build(cfg) -> NLayerDiscriminator:
  """``config.disc`` -> NLayerDiscriminator; unset fields take the class
  defaults (taming's 3-layer, 64-filter PatchGAN). ``image_size``,
  ``image_width`` and ``in_channels`` are read by ``example_inputs``,
  ``optimizer`` by the trainer. Raises ConfigError for an unknown key."""
  return NLayerDiscriminator(**models.config_fields(
      cfg, NLayerDiscriminator,
      ignore=("image_size", "image_width", "in_channels", "optimizer")))


def example_inputs(cfg, batch_size: int = 1):
  size = cfg.get("image_size", 256)
  return (jnp.zeros((batch_size, size, size, cfg.get("in_channels", 3)),
                    jnp.float32),)

