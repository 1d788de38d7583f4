"""Pixel-(un)shuffle resampling and the reflect-padded CNN levels built on it.

The Equivariant tokenizer's CNN (LDM-style, torch ``padding_mode='reflect'``
everywhere) resamples without strided or transposed convs: a level halves the
resolution with a conv to C/f channels then pixel-unshuffle, plus the f-pixel
average of its input (``DownsampleResidual``); it doubles it with a conv to
C*f channels then pixel-shuffle, plus the nearest-neighbour upsample
(``UpsampleResidual``). Factors may differ per axis ((2, 1) halves rows only).
``level`` (a ``resnet.Level``) / ``Mid`` stack the shared ``resnet`` blocks
around them; ``conv1d`` is the reflect-padded Conv1d over a token sequence.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
from flax.core import FrozenDict

from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import resnet

CONV1D_NAMES = (None, "conv_in", "conv_out")


def reflect_pad(x, pad: int, axes: Sequence[int]):
  """Reflect-pads ``axes`` of ``x`` by ``pad`` on both sides (torch 'reflect':
  the edge sample is not repeated). A length-1 axis repeats its only value
  (torch would reject it)."""
  widths = [(0, 0)] * x.ndim
  for a in axes:
    widths[a] = (pad, pad)
  return jnp.pad(x, widths, mode="reflect")


def pixel_unshuffle(x, factors=(2, 2)):
  """(B, H, W, C) -> (B, H/fh, W/fw, C*fh*fw), channel order (c, i, j) as
  torch; fh, fw must divide H, W."""
  b, h, w, c = x.shape
  fh, fw = factors
  x = x.reshape(b, h // fh, fh, w // fw, fw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // fh, w // fw, c * fh * fw)


def pixel_shuffle(x, factors=(2, 2)):
  """Inverse of ``pixel_unshuffle``: (B, h, w, C*fh*fw) -> (B, h*fh, w*fw, C)."""
  b, h, w, cf = x.shape
  fh, fw = factors
  c = cf // (fh * fw)
  x = x.reshape(b, h, w, c, fh, fw)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * fh, w * fw, c)


# Stride-1 conv with torch ``padding=k//2, padding_mode='reflect'`` and
# PyTorch's default init (the official sets none):
# conv2d(x, features, name, kernel_size=3, dtype=, param_dtype=).
conv2d = functools.partial(resnet.conv2d, padding="reflect", conv_init="torch")


def conv1d_layer(features: int, name: str, *, kernel_size: int = 3,
                 dtype=jnp.float32, param_dtype=jnp.float32) -> layers.Conv:
  """Conv1d over tokens, kernel (k, in, out), PyTorch's default init; call
  on reflect-padded input."""
  init = layers.inits("torch")
  return layers.Conv(features, (kernel_size,), padding="VALID", dtype=dtype,
                     param_dtype=param_dtype, use_bias=False,
                     kernel_init=layers.named(init["kernel_init"],
                                              CONV1D_NAMES),
                     bias_init=layers.named(init["bias_init"], ("conv_out",)),
                     name=name)


def conv1d(x, layer: layers.Conv, kernel_size: int = 3):
  """(B, L, C) -> (B, L, C'): ``layer`` after reflect padding along L."""
  return layer(reflect_pad(x, kernel_size // 2, (1,)))


class _ShuffleConv(nn.Module):
  """Holds the 3x3 conv of a (un)shuffle resampler (official ``*.conv.conv``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv2d(x, self.features, "conv", dtype=self.dtype,
                  param_dtype=self.param_dtype)


class DownsampleResidual(nn.Module):
  """conv(C -> C/f) then pixel-unshuffle, plus the f-pixel average of x:
  (B, H, W, C) -> (B, H/fh, W/fw, C), f = fh * fw. Raises ``ValueError``
  unless f divides C."""
  factors: tuple[int, int] = (2, 2)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, g = x.shape[-1], self.factors[0] * self.factors[1]
    if c % g:
      raise ValueError(f"Pixel-unshuffle downsampling needs channels ({c}) "
                       f"divisible by {g}.")
    res = _ShuffleConv(c // g, self.dtype, self.param_dtype, name="conv")(x)
    res = pixel_unshuffle(res, self.factors)
    avg = pixel_unshuffle(x, self.factors)
    avg = avg.reshape(*avg.shape[:-1], c, g).mean(-1)
    return res + avg


class UpsampleResidual(nn.Module):
  """conv(C -> C*f) then pixel-shuffle, plus the nearest-neighbour upsample of
  x: (B, H, W, C) -> (B, H*fh, W*fw, C), f = fh * fw."""
  factors: tuple[int, int] = (2, 2)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, g = x.shape[-1], self.factors[0] * self.factors[1]
    res = _ShuffleConv(c * g, self.dtype, self.param_dtype, name="conv")(x)
    res = pixel_shuffle(res, self.factors)
    return res + pixel_shuffle(jnp.repeat(x, g, axis=-1), self.factors)


# The ResnetBlock options of this CNN. Reflect padding keeps a uniform image's
# maps constant: its GroupNorms guard their gradients (layers.GroupNorm).
REFLECT = FrozenDict(padding="reflect", uniform_guard=True,
                     conv_init="torch")


@functools.lru_cache(maxsize=None)
def _shuffle(resample: str, factors: tuple[int, int]):
  """(submodule name, module) of a pixel-(un)shuffle resampler; cached so
  equal levels hold the same resampler object."""
  classes = {"down": DownsampleResidual, "up": UpsampleResidual}
  if resample not in classes:
    raise ValueError(f"resample={resample!r}; use None, 'down' or 'up'.")
  cls = classes[resample]
  return f"{resample}sample", functools.partial(cls, tuple(factors))


def level(out_channels: int, num_blocks: int, *, attn: bool,
          resample: str | None = None, factors: tuple[int, int] = (2, 2),
          **kw) -> resnet.Level:
  """An Equivariant level: reflect-padded res blocks ``block_{j}`` (+
  ``attn_{j}``), then (``resample`` "down" / "up") ``DownsampleResidual`` /
  ``UpsampleResidual`` by ``factors``; ``kw``: the remaining
  ``resnet.Level`` fields. Raises ``ValueError`` for another ``resample``."""
  return resnet.Level(
      out_channels, num_blocks, attn=attn, block=REFLECT,
      resample=_shuffle(resample, tuple(factors)) if resample else None, **kw)


class Mid(nn.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution (reflect padding):
  (B, H, W, C) -> (B, H, W, C) in ``dtype``."""
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return resnet.mid_stack(x, train, block=REFLECT,
                            names=("block_1", "attn_1", "block_2"),
                            dropout=self.dropout, remat=self.remat,
                            dtype=self.dtype, param_dtype=self.param_dtype)
