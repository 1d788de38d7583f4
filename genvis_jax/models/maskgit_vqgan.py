"""MaskGIT VQGAN tokenizer (the tokenizer RAR uses), NHWC Flax Linen.

Architecture facts (see specs/maskgit_vqgan.md): convolutional VQGAN without
attention, TF "SAME" padding, 2x2 average-pool downsampling, nearest x2 upsampling
+ conv, GroupNorm(32, eps 1e-6), SiLU, codebook 1024 x 256 with plain squared-L2
search. Input pixels in [0, 1]; ``decode`` clamps to [0, 1].

The resolution levels, res blocks and upsampler are the shared ones of
``genvis_jax.models.layers.resnet`` with MaskGIT's options (``RES_BLOCK``).
Official -> Flax names: ``genvis_jax.convert.maskgit_vqgan.RENAMES``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
from flax.core import FrozenDict
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import resnet
from genvis_jax.models.quantizers import VectorQuantizer


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H/2, W/2, C) mean of 2x2 blocks (torch avg_pool2d(2, 2)).
  Raises ``ConfigError`` for an odd H or W."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise errors.ConfigError(
        f"Average-pool downsampling needs even height/width, got "
        f"{h}x{w}; use an image size divisible by "
        f"2**(len(channel_mult) - 1).")
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


# MaskGIT's block quirks: TF SAME padding, bias-free convs, and the 1x1
# shortcut applied to the post-conv2 features (needed for checkpoint parity).
RES_BLOCK = FrozenDict(padding="same", use_bias=False, shortcut_from="output")


def res_blocks(x, train: bool, *, count: int, out_channels: int, dropout: float,
               remat: str, prefix: str, kw: dict):
  """``count`` MaskGIT res blocks named ``{prefix}{j}`` (the mid stack); call
  inside a compact method. (B, H, W, C) -> (B, H, W, out_channels)."""
  block = resnet.remat_block(resnet.ResnetBlock, remat)
  for j in range(count):
    x = block(out_channels, dropout, **RES_BLOCK, name=f"{prefix}{j}", **kw)(
        x, train)
  return x


class AvgPool(nn.Module):
  """The downsampler: 2x2 average pool (no parameters), (B, H, W, C) ->
  (B, H/2, W/2, C); ``ConfigError`` for an odd H or W."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __call__(self, x):
    return avg_pool_2x2(x)


# The levels' resamplers: (submodule name, module).
RESAMPLERS = {"down": ("downsample", AvgPool),
              "up": ("upsample", functools.partial(resnet.Upsample, "same"))}


def level(out_channels: int, num_blocks: int, *, resample: str | None = None,
          **kw) -> resnet.Level:
  """A MaskGIT level: res blocks ``block_{j}``, then (``resample`` "up")
  ``upsample`` (nearest x2 + conv3x3) or ("down") the average pool; ``kw``:
  the remaining ``resnet.Level`` fields. Raises ``ValueError`` for another
  ``resample``."""
  if resample not in (None, *RESAMPLERS):
    raise ValueError(f"resample={resample!r}; use None, 'down' or 'up'.")
  return resnet.Level(out_channels, num_blocks, block=RES_BLOCK,
                      resample=RESAMPLERS.get(resample), **kw)


class Encoder(nn.Module):
  """(B, H, W, 3) in [0, 1] -> (B, H/f, W/f, z_channels), f = 2**(levels - 1)."""
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(self.hidden_channels, 3, use_bias=False, name="conv_in",
                    **kw)(x)
    levels = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      x = level(self.hidden_channels * mult, self.num_res_blocks,
                resample="down" if i != levels - 1 else None,
                dropout=self.dropout, remat=self.remat, name=f"down_{i}",
                **kw)(x, train)[0]
    x = res_blocks(x, train, count=self.num_res_blocks,
                   out_channels=self.hidden_channels * self.channel_mult[-1],
                   dropout=self.dropout, remat=self.remat, prefix="mid_", kw=kw)
    x = nn.silu(layers.group_norm(name="norm_out", **kw)(x))
    return layers.conv(self.z_channels, 1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """(B, h, w, z_channels) -> (B, h*f, w*f, out_channels), unclipped."""
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_channels: int = 3
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mid = self.hidden_channels * self.channel_mult[-1]
    x = layers.conv(mid, 3, name="conv_in", **kw)(z)
    x = res_blocks(x, train, count=self.num_res_blocks, out_channels=mid,
                   dropout=self.dropout, remat=self.remat, prefix="mid_", kw=kw)
    for i in reversed(range(len(self.channel_mult))):
      x = level(self.hidden_channels * self.channel_mult[i],
                self.num_res_blocks, resample="up" if i else None,
                dropout=self.dropout, remat=self.remat, name=f"up_{i}",
                **kw)(x, train)[0]
    x = nn.silu(layers.group_norm(name="norm_out", **kw)(x))
    return layers.conv(self.out_channels, 3, name="conv_out", **kw)(x)


class MaskGITVQGAN(nn.Module):
  """MaskGIT VQGAN: encoder -> vector quantizer -> decoder.

  ``__call__(images, train=False) -> (reconstructions, aux)``:
    images: (B, H, W, 3) float in [0, 1]; H, W divisible by 2**(levels - 1).
    reconstructions: (B, H, W, 3) float32, *not* clipped (training target space).
    aux: quantizer_loss (total VQ loss to add), codebook_loss, commitment_loss,
      entropy_loss, usage, perplexity (float32 scalars) and codes (B, h, w) int32.
  ``encode(images)`` -> codes (B, h, w) int32, row-major token grid.
  ``decode(codes)`` -> images (B, H, W, 3) float32 clipped to [0, 1]; codes
  outside 0..num_codes-1 read no row (jnp.take fills NaN): NaN images.
  ``encode_latents(images)`` -> pre-quantization latents (B, h, w, z_channels).
  ``decode_latents(z_q)`` -> unclipped float32 images from (quantized)
    latents (B, h, w, z_channels).
  Raises ``ConfigError`` when ``code_dim`` != ``z_channels`` (no quant_conv)
  or an image side is not divisible by 2**(levels - 1); ``ValueError`` for
  images that are not (B, H, W, 3) or codes that are not (B, h, w);
  ``TypeError`` for non-integer codes.
  """
  value_range = (0.0, 1.0)  # pixels of encode inputs / decode outputs
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  num_codes: int = 1024
  code_dim: int = 256
  commitment_cost: float = 0.25
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.code_dim != self.z_channels:
      raise errors.ConfigError(
          f"MaskGIT VQGAN has no quant_conv: config.model.code_dim "
          f"({self.code_dim}) must equal config.model.z_channels "
          f"({self.z_channels}).")
    kw = dict(hidden_channels=self.hidden_channels,
              channel_mult=tuple(self.channel_mult),
              num_res_blocks=self.num_res_blocks, dropout=self.dropout,
              remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **kw)
    self.quantize = VectorQuantizer(self.num_codes, self.code_dim,
                                    beta=self.commitment_cost,
                                    param_dtype=self.param_dtype)
    self.decoder = Decoder(out_channels=3, **kw)

  def encode_latents(self, images, train: bool = False):
    images_lib.check_images(images)
    return self.encoder(images, train)

  def decode_latents(self, z_q, train: bool = False):
    return self.decoder(z_q, train).astype(jnp.float32)

  def encode(self, images):
    return self.quantize.nearest(self.encode_latents(images))

  def decode(self, codes):
    images_lib.check_codes(codes)
    return jnp.clip(self.decode_latents(self.quantize.lookup(codes)), 0.0, 1.0)

  def __call__(self, images, train: bool = False):
    z = self.encode_latents(images, train)
    z_q, codes, aux = self.quantize(z, train)
    recon = self.decode_latents(z_q, train)
    return recon, {**aux, "codes": codes}


# Fields whose builder derives them from others when unset, at the config
# value meaning unset (``models.config_defaults``).
CONFIG_UNSET = {"code_dim": 0}


def build(cfg) -> MaskGITVQGAN:
  """``config.model`` -> MaskGITVQGAN; unset fields take the class defaults
  (the official 256 px, f16, 1024-code model) and ``code_dim``, unset or
  0, follows ``z_channels`` (MaskGIT has no quant_conv). ``image_size`` is
  read by ``example_inputs`` only. Raises ConfigError for an unknown key or
  channel widths GroupNorm cannot split."""
  code_dim = {} if cfg.get("code_dim") else {
      "code_dim": cfg.get("z_channels", MaskGITVQGAN.z_channels)}
  model = MaskGITVQGAN(**models.config_fields(
      cfg, MaskGITVQGAN, ignore=("image_size",), **code_dim))
  layers.check_groups("hidden_channels", model.hidden_channels,
                      "channel_mult", model.channel_mult)
  return model


example_inputs = images_lib.square_inputs   # (B, image_size, image_size, 3) zeros

