"""LlamaGen VQ tokenizer (the FQGAN baseline, the k = 1 case of FQ), NHWC Flax Linen.

Architecture facts (specs/maskgit_vqgan.md, LlamaGen part): CNN with ch 128,
ch_mult (1, 1, 2, 2, 4) for ds16 / (1, 2, 2, 4) for ds8, 2 res blocks per encoder
level and 3 per decoder level, GroupNorm(32, eps 1e-6), swish, 3x3 convs with
bias and padding 1, downsample = pad (0, 1, 0, 1) then stride-2 conv3x3,
upsample = nearest x2 + conv3x3, attention only at the lowest resolution
(encoder last level + mid res-attn-res; decoder first level + mid). Encoder
conv_out is 3x3 to z = 256; quant_conv 1x1 256 -> 8; codebook 16384 x 8 with
latents and codes L2-normalised; post_quant_conv 1x1 8 -> 256. Pixels in
[-1, 1]; ``decode`` clips to [-1, 1].

The resolution levels (res blocks ``res_{j}``, attention ``attn_{j}``), their
blocks and the upsampler are the shared ones of
``genvis_jax.models.layers.resnet``. Official -> Flax names:
``genvis_jax.convert.llamagen_vq.RENAMES``. Decoder ``conv_blocks_{i}`` run
lowest resolution first (index i = level n-1-i), as in the official ModuleList.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import resnet
from genvis_jax.models.quantizers import VectorQuantizer

_PAD1 = ((1, 1), (1, 1))  # torch padding=1
# The official sets no init of its own: every conv starts from PyTorch's
# default (``layers.torch_kernel_init`` / ``torch_bias_init``).
TORCH_INIT = layers.inits("torch")
# ResnetBlock's other defaults are LlamaGen's: torch zero padding, biases,
# the 1x1 shortcut on the block input.
BLOCK = FrozenDict(conv_init="torch")


def _conv3(features, name, kw, strides=1, padding=_PAD1):
  return layers.conv(features, 3, strides=strides, padding=padding, name=name,
                     **kw, **TORCH_INIT)


def conv1x1(features, name, kw):
  """A 1x1 conv of this family (``quant_conv``, ``post_quant_conv``)."""
  return layers.conv(features, 1, name=name, **kw, **TORCH_INIT)


class Downsample(nn.Module):
  """Zero-pad one row/column at the bottom/right, then conv3x3 stride 2:
  (B, H, W, C) -> (B, H/2, W/2, C) for even H, W."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv3(x.shape[-1], "conv",
                  dict(dtype=self.dtype, param_dtype=self.param_dtype),
                  strides=2, padding="VALID")(x)


# The levels' resamplers: (submodule name, module).
_DOWNSAMPLE = ("downsample", Downsample)
_UPSAMPLE = ("upsample", functools.partial(resnet.Upsample, padding="torch",
                                           conv_init="torch"))


class CNNBase(nn.Module):
  """Shared hyper-parameters and the mid stack (``mid_0`` res, ``mid_1`` attn,
  ``mid_2`` res) of the LlamaGen encoder/decoder."""
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def _kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def top_channels(self) -> int:
    """Channels at the lowest resolution: hidden_channels * channel_mult[-1]."""
    return self.hidden_channels * self.channel_mult[-1]

  def _mid(self, x, train):
    return resnet.mid_stack(x, train, block=BLOCK, dropout=self.dropout,
                            remat=self.remat, **self._kw)

  def _trunk(self, x, train):
    """Encoder up to and including mid: (B, H, W, 3) -> (B, H/f, W/f, top)."""
    x = _conv3(self.hidden_channels, "conv_in", self._kw)(x)
    n = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      last = i == n - 1
      x = resnet.Level(self.hidden_channels * mult, self.num_res_blocks,
                       attn=last, block=BLOCK, block_name="res",
                       resample=None if last else _DOWNSAMPLE,
                       dropout=self.dropout, remat=self.remat,
                       name=f"conv_blocks_{i}", **self._kw)(x, train)[0]
    return self._mid(x, train)


class Encoder(CNNBase):
  """(B, H, W, 3) in [-1, 1] -> (B, H/f, W/f, z_channels), f = 2**(levels-1)."""
  z_channels: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self._trunk(x, train)
    x = nn.silu(layers.group_norm(name="norm_out", **self._kw)(x))
    return _conv3(self.z_channels, "conv_out", self._kw)(x)


class Decoder(CNNBase):
  """(B, h, w, z_channels) -> (B, h*f, w*f, out_channels), unclipped.

  ``num_res_blocks`` counts the decoder's res blocks per level (LlamaGen: the
  encoder's + 1).
  """
  num_res_blocks: int = 3
  out_channels: int = 3

  @nn.compact
  def __call__(self, z, train: bool = False):
    x = _conv3(self.top_channels, "conv_in", self._kw)(z)
    x = self._mid(x, train)
    n = len(self.channel_mult)
    for idx, level in enumerate(reversed(range(n))):
      x = resnet.Level(self.hidden_channels * self.channel_mult[level],
                       self.num_res_blocks, attn=idx == 0, block=BLOCK,
                       block_name="res",
                       resample=_UPSAMPLE if level else None,
                       dropout=self.dropout, remat=self.remat,
                       name=f"conv_blocks_{idx}", **self._kw)(x, train)[0]
    x = nn.silu(layers.group_norm(name="norm_out", **self._kw)(x))
    return _conv3(self.out_channels, "conv_out", self._kw)(x)


class VQBase(nn.Module):
  """The settings LlamaGen VQ and FQGAN share: the LlamaGen CNN, the
  L2-normalised codebook(s) and the compute dtypes (defaults: VQ-16)."""
  value_range = (-1.0, 1.0)  # pixels of encode inputs / decode outputs
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  decoder_res_blocks: int = 3
  z_channels: int = 256
  num_codes: int = 16384
  code_dim: int = 8
  commitment_cost: float = 0.25
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  entropy_group_size: int = 0
  l2_norm: bool = True
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    """Downsampling factor: 2**(len(channel_mult) - 1) (16 for VQ-16)."""
    return 2 ** (len(self.channel_mult) - 1)

  def cnn_kwargs(self) -> dict:
    """The ``CNNBase`` fields of the encoder / decoder."""
    return dict(hidden_channels=self.hidden_channels,
                channel_mult=tuple(self.channel_mult), dropout=self.dropout,
                remat=self.remat, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def codebook(self, name: str | None = None) -> VectorQuantizer:
    """A ``VectorQuantizer`` with these settings (call in ``setup``)."""
    return VectorQuantizer(
        self.num_codes, self.code_dim, beta=self.commitment_cost,
        l2_norm=self.l2_norm, entropy_weight=self.entropy_weight,
        entropy_temperature=self.entropy_temperature,
        entropy_group_size=self.entropy_group_size,
        param_dtype=self.param_dtype, name=name)


class LlamaGenVQ(VQBase):
  """LlamaGen VQ: encoder -> quant_conv -> L2 VQ -> post_quant_conv -> decoder.

  ``__call__(images, train=False) -> (reconstructions, aux)``:
    images: (B, H, W, 3) float in [-1, 1]; H, W divisible by 2**(levels-1).
    reconstructions: (B, H, W, 3) float32, *not* clipped.
    aux: quantizer_loss (codebook + beta * commitment + entropy_weight *
      entropy), codebook_loss, commitment_loss, entropy_loss, usage,
      perplexity (float32 scalars) and codes (B, h, w) int32.
  ``encode(images)`` -> codes (B, h, w) int32, row-major token grid.
  ``decode(codes)`` -> images (B, H, W, 3) float32 clipped to [-1, 1].
  ``encode_latents(images)`` -> quant_conv output (B, h, w, code_dim).
  ``decode_latents(z_q)`` -> unclipped float32 images from (quantized)
    latents (B, h, w, code_dim).
  Raises ``ValueError`` for images that are not (B, H, W, 3) or codes that
  are not (B, h, w), ``ConfigError`` for H, W not divisible by the factor
  (as the other tokenizers); ``TypeError``
  for non-integer codes (``VectorQuantizer.lookup``).
  """

  def setup(self):
    kw = self.cnn_kwargs()
    pk = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(num_res_blocks=self.num_res_blocks,
                           z_channels=self.z_channels, **kw)
    self.quant_conv = conv1x1(self.code_dim, "quant_conv", pk)
    self.quantize = self.codebook()
    self.post_quant_conv = conv1x1(self.z_channels, "post_quant_conv", pk)
    self.decoder = Decoder(num_res_blocks=self.decoder_res_blocks,
                           out_channels=3, **kw)

  def encode_latents(self, images, train: bool = False):
    images_lib.check_images(images, factor=self.factor)
    return self.quant_conv(self.encoder(images, train))

  def decode_latents(self, z_q, train: bool = False):
    h = self.post_quant_conv(z_q.astype(self.dtype))
    return self.decoder(h, train).astype(jnp.float32)

  def encode(self, images):
    return self.quantize.nearest(self.encode_latents(images))

  def decode(self, codes):
    images_lib.check_codes(codes)
    return jnp.clip(self.decode_latents(self.quantize.lookup(codes)), -1.0, 1.0)

  def __call__(self, images, train: bool = False):
    z = self.encode_latents(images, train)
    z_q, codes, aux = self.quantize(z, train)
    return self.decode_latents(z_q, train), {**aux, "codes": codes}


# Fields whose builder derives them from others when unset, at the config
# value meaning unset (``models.config_defaults``); FQGAN's decoder too.
CONFIG_UNSET = {"decoder_res_blocks": 0}


def decoder_res_blocks(cfg, cls) -> dict:
  """Unset (or 0) ``decoder_res_blocks`` follows ``num_res_blocks`` + 1
  (LlamaGen's decoder has one more block per level)."""
  if cfg.get("decoder_res_blocks"):
    return {}
  return {"decoder_res_blocks": cfg.get("num_res_blocks", cls.num_res_blocks) + 1}


def build(cfg) -> LlamaGenVQ:
  """``config.model`` -> LlamaGenVQ; unset fields take the class defaults
  (VQ-16: 16384 x 8 L2-normalised codes). ``image_size`` is read by
  ``example_inputs`` only. Raises ConfigError for an unknown key or
  channel widths GroupNorm cannot split."""
  model = LlamaGenVQ(**models.config_fields(
      cfg, LlamaGenVQ, ignore=("image_size",),
      **decoder_res_blocks(cfg, LlamaGenVQ)))
  layers.check_groups("hidden_channels", model.hidden_channels,
                      "channel_mult", model.channel_mult)
  return model


example_inputs = images_lib.square_inputs   # (B, image_size, image_size, 3) zeros
