"""Equivariant column tokenizer (Dong et al. 2025), NHWC Flax Linen.

An LDM-style CNN encodes a fixed-height image to a 16-pixel-high feature map;
every feature column becomes one continuous token, so the width is free and
the token sequence is translation-equivariant along x:

  images (B, H, W, 3) in [-1, 1]
    -> CNN (reflect padding, residual pixel-unshuffle downsampling, 2D
       self-attention at the lowest resolution) -> (B, H/16, W/16, 256)
    -> columns (B, W/16, 256 * H/16 = 4096) -> encoder1d Conv1d(4096, k3)
    -> quant_layer Conv1d(4096 -> 256, k3): mean mu (B, W/16, 256)
  latents -> post_quant_layer Conv1d(256 -> 4096) -> decoder1d Conv1d(4096)
    -> (B, H/16, W/16, 256) -> CNN with residual pixel-shuffle upsampling.
All Conv1d use reflect padding along the token axis. The posterior is
sigma-VAE style: only mu is predicted; a training sample is
``mu + s * eps`` with one ``s ~ N(0, (std/0.8)^2)`` per image, clamped to
``+-std``; "KL" is ``0.5 * sum(mu^2)`` per image.

The res and attention blocks are the shared ones of
``genvis_jax.models.layers.resnet`` (reflect padding). Official -> Flax
names: ``genvis_jax.convert.eq.TOKENIZER_RENAMES``. The optional semantic
decoder (``semantic_decoder/down_{i}/block_{j}``) maps a decoder feature map
to 768-d features aligned with a frozen teacher; the official module also
holds a third, never-called block per level (``down.{i}.block.2``) that has no
counterpart here (the converter drops it).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import resnet

Dtype = Any
CONV1D_NAMES = (None, "conv_in", "conv_out")


# --- pure helpers --------------------------------------------------------------

def reflect_pad(x, pad: int, axes: Sequence[int]):
  """Reflect-pads ``axes`` of ``x`` by ``pad`` on both sides (torch 'reflect':
  the edge sample is not repeated). A length-1 axis repeats its only value
  (torch would reject it)."""
  widths = [(0, 0)] * x.ndim
  for a in axes:
    widths[a] = (pad, pad)
  return jnp.pad(x, widths, mode="reflect")


def pixel_unshuffle(x, factors=(2, 2)):
  """(B, H, W, C) -> (B, H/fh, W/fw, C*fh*fw), channel order (c, i, j) as torch."""
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


def columnize(h):
  """(B, Hl, W, C) -> (B, W, C * Hl) with feature index c * Hl + row (torch)."""
  b, hl, w, c = h.shape
  return h.transpose(0, 2, 3, 1).reshape(b, w, c * hl)


def rasterize(t, channels: int):
  """Inverse of ``columnize``: (B, W, C * Hl) -> (B, Hl, W, C)."""
  b, w, f = t.shape
  return t.reshape(b, w, channels, f // channels).transpose(0, 3, 1, 2)


def _factors(level: int, len_down_scale: int):
  """Resampling factors (rows, cols) after encoder level ``level``."""
  return (2, 2) if level < len_down_scale else (2, 1)


# --- layers ---------------------------------------------------------------------

# Stride-1 conv with torch ``padding=k//2, padding_mode='reflect'``:
# conv2d(x, features, name, kernel_size=3, dtype=, param_dtype=).
conv2d = functools.partial(resnet.conv2d, padding="reflect")


def conv1d_layer(features: int, name: str, *, kernel_size: int = 3,
                 dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Conv:
  """Conv1d over tokens, kernel (k, in, out); call on reflect-padded input."""
  return nn.Conv(features, (kernel_size,), padding="VALID", dtype=dtype,
                 param_dtype=param_dtype,
                 kernel_init=layers.named(layers.conv_kernel_init, CONV1D_NAMES),
                 bias_init=layers.named(layers.zeros, ("conv_out",)), name=name)


def conv1d(x, layer: nn.Conv, kernel_size: int = 3):
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
  """conv(C -> C/f) then pixel-unshuffle, plus the f-pixel average of x."""
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
  """conv(C -> C*f) then pixel-shuffle, plus the nearest-neighbour upsample of x."""
  factors: tuple[int, int] = (2, 2)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, g = x.shape[-1], self.factors[0] * self.factors[1]
    res = _ShuffleConv(c * g, self.dtype, self.param_dtype, name="conv")(x)
    res = pixel_shuffle(res, self.factors)
    return res + pixel_shuffle(jnp.repeat(x, g, axis=-1), self.factors)


def _res_block(remat: str):
  """The shared res block under ``remat``; call with ``padding="reflect"``."""
  return resnet.remat_block(resnet.ResnetBlock, remat)


class Level(nn.Module):
  """One resolution level: ``num_blocks`` x (res block [+ attention]), then an
  optional resampler (``downsample`` / ``upsample``)."""
  out_channels: int
  num_blocks: int
  attn: bool
  resample: str | None = None        # None | "down" | "up"
  factors: tuple[int, int] = (2, 2)
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Returns (output, features before the resampler)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = _res_block(self.remat)
    for j in range(self.num_blocks):
      x = block(self.out_channels, self.dropout, padding="reflect",
                name=f"block_{j}", **kw)(x, train)
      if self.attn:
        x = resnet.AttnBlock(name=f"attn_{j}", **kw)(x)
    pre = x
    if self.resample == "down":
      x = DownsampleResidual(self.factors, name="downsample", **kw)(x)
    elif self.resample == "up":
      x = UpsampleResidual(self.factors, name="upsample", **kw)(x)
    return x, pre


class Mid(nn.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution."""
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block, c = _res_block(self.remat), x.shape[-1]
    x = block(c, self.dropout, padding="reflect", name="block_1", **kw)(x, train)
    x = resnet.AttnBlock(name="attn_1", **kw)(x)
    return block(c, self.dropout, padding="reflect", name="block_2", **kw)(
        x, train)


class Encoder1D(nn.Module):
  """(B, H, W, 3) -> column features (B, W / f, z_channels * H / 2**(L-1))."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  len_down_scale: int = 4
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = conv2d(x, self.ch, "conv_in", **kw)
    n = len(self.ch_mult)
    for i, mult in enumerate(self.ch_mult):
      h = Level(self.ch * mult, self.num_res_blocks,
                attn=self.resolution // 2 ** i in self.attn_resolutions,
                resample="down" if i != n - 1 else None,
                factors=_factors(i, self.len_down_scale), dropout=self.dropout,
                remat=self.remat, name=f"down_{i}", **kw)(h, train)[0]
    h = Mid(self.dropout, self.remat, name="mid", **kw)(h, train)
    h = nn.swish(layers.group_norm(name="norm_out", **kw)(h))
    h = conv2d(h, self.z_channels, "conv_out", **kw)
    t = columnize(h)
    return conv1d(t, conv1d_layer(t.shape[-1], "encoder1d", **kw))


class Decoder1D(nn.Module):
  """Column features (B, W', z_channels * Hl) -> (images (B, H, W, out_ch),
  semantic feature map or None)."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  len_down_scale: int = 4
  semantic_map: str = "res"       # base | mid | res: where the semantic map is tapped
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = conv1d(t, conv1d_layer(t.shape[-1], "decoder1d", **kw))
    h = rasterize(t, self.z_channels)
    n = len(self.ch_mult)
    h = conv2d(h, self.ch * self.ch_mult[-1], "conv_in", **kw)
    sem = h if self.semantic_map == "base" else None
    h = Mid(self.dropout, self.remat, name="mid", **kw)(h, train)
    sem = h if self.semantic_map == "mid" else sem
    for i in reversed(range(n)):
      # Level i mirrors encoder level i - 1's resampling factors.
      h, pre = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                     attn=self.resolution // 2 ** i in self.attn_resolutions,
                     resample="up" if i != 0 else None,
                     factors=_factors(i - 1, self.len_down_scale),
                     dropout=self.dropout, remat=self.remat, name=f"up_{i}",
                     **kw)(h, train)
      if i == n - 1 and self.semantic_map == "res":
        sem = pre
    h = nn.swish(layers.group_norm(name="norm_out", **kw)(h))
    return conv2d(h, self.out_ch, "conv_out", **kw), sem


class SemanticDecoder(nn.Module):
  """Decoder feature map (B, h, w, C) -> (B, h, w, out_ch) semantic features.

  Level i: ``num_res_blocks`` res blocks to ``ch * mult_{i+1}`` channels, where
  the multipliers are ``ch_mult + (out_ch // ch,)``; then GN, swish, conv_out.
  """
  ch: int = 64
  out_ch: int = 768
  ch_mult: Sequence[int] = (8, 12)
  num_res_blocks: int = 2
  downsample_scale: int = 0
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mults = tuple(self.ch_mult) + (self.out_ch // self.ch,)
    for i in range(len(self.ch_mult)):
      h = Level(self.ch * mults[i + 1], self.num_res_blocks, attn=False,
                resample="down" if i < self.downsample_scale else None,
                dropout=self.dropout, remat=self.remat, name=f"down_{i}",
                **kw)(h, train)[0]
    h = nn.swish(layers.group_norm(name="norm_out", **kw)(h))
    return conv2d(h, self.out_ch, "conv_out", **kw)


def sample_posterior(mean, rng, std: float = 2.5):
  """sigma-VAE sample: ``mean + s * eps``, one ``s ~ N(0, (std/0.8)^2)`` per
  image clamped to ``[-std, std]``. mean (B, L, C) -> (B, L, C)."""
  k_s, k_e = jax.random.split(rng)
  s = jax.random.normal(k_s, (mean.shape[0],), jnp.float32) * (std / 0.8)
  s = jnp.clip(s, -std, std).reshape((-1,) + (1,) * (mean.ndim - 1))
  return mean + s * jax.random.normal(k_e, mean.shape, jnp.float32)


def kl_loss(mean):
  """Per-image "KL" of the sigma-VAE: 0.5 * sum(mean^2). (B, L, C) -> (B,)."""
  m = mean.astype(jnp.float32)
  return 0.5 * jnp.sum(jnp.square(m), axis=tuple(range(1, m.ndim)))


class EqTokenizer(nn.Module):
  """Equivariant column tokenizer (see module docstring). Pixels in [-1, 1].

  ``__call__(images, train=False, rng=None)`` -> ``(recon, aux)``:
    images (B, H, W, 3), H = ``resolution``, W a multiple of ``token_width``.
    recon (B, H, W, 3) float32, unclipped. ``rng`` given: latents are posterior
    samples (``sample_posterior``), else the mean. ``train`` enables dropout.
    aux: ``kl`` (batch mean of 0.5 * sum(mean^2)), ``mean`` (B, W', C) and
    ``latents`` (B, W', C) the decoded latents, plus ``semantic`` (B, h, w, 768)
    when the semantic decoder is on.
  ``encode(images)`` -> posterior mean (B, W / token_width, embed_dim) float32.
  ``decode(latents)`` -> images (B, H, W' * token_width, 3) clipped to [-1, 1].
  """
  value_range = (-1.0, 1.0)  # pixels of encode inputs / decode outputs
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 256
  embed_dim: int = 256
  len_down_scale: int = 4
  std: float = 2.5
  dropout: float = 0.0
  semantic: bool = False
  semantic_map: str = "res"
  semantic_ch: int = 64
  semantic_ch_mult: Sequence[int] = (8, 12)
  semantic_out: int = 768
  semantic_res_blocks: int = 2
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def token_width(self) -> int:
    """Pixels per token column: 2 ** (number of (2, 2) downsamplings)."""
    return 2 ** min(self.len_down_scale, len(self.ch_mult) - 1)

  @property
  def latent_height(self) -> int:
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  @property
  def post_channels(self) -> int:
    return self.z_channels * self.latent_height

  def setup(self):
    if self.resolution % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(f"resolution {self.resolution} must be divisible by "
                       f"2**{len(self.ch_mult) - 1}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cnn = dict(ch=self.ch, ch_mult=tuple(self.ch_mult),
               num_res_blocks=self.num_res_blocks,
               attn_resolutions=tuple(self.attn_resolutions),
               resolution=self.resolution, z_channels=self.z_channels,
               len_down_scale=self.len_down_scale, dropout=self.dropout,
               remat=self.remat, **kw)
    self.encoder = Encoder1D(**cnn)
    self.quant_layer = conv1d_layer(self.embed_dim, "quant_layer", **kw)
    self.post_quant_layer = conv1d_layer(self.post_channels, "post_quant_layer",
                                         **kw)
    self.decoder = Decoder1D(out_ch=3, semantic_map=self.semantic_map, **cnn)
    if self.semantic:
      self.semantic_decoder = SemanticDecoder(
          self.semantic_ch, self.semantic_out, tuple(self.semantic_ch_mult),
          self.semantic_res_blocks, dropout=self.dropout, remat=self.remat,
          **kw)

  def _check_images(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Expected NHWC RGB images (B, H, W, 3), got "
                       f"{images.shape}.")
    _, h, w, _ = images.shape
    if h != self.resolution:
      raise ValueError(
          f"Image height {h} != config.model.resolution {self.resolution}: the "
          f"column tokenizer has a fixed height (its Conv1d sees "
          f"{self.post_channels} = z_channels * height/16 features); resize "
          f"or crop to height {self.resolution}.")
    if w % self.token_width:
      raise ValueError(f"Image width {w} is not a multiple of the token width "
                       f"{self.token_width} px; crop or pad the width.")

  def _check_latents(self, latents):
    if latents.ndim != 3 or latents.shape[-1] != self.embed_dim:
      raise ValueError(f"Expected latents (B, columns, {self.embed_dim}), got "
                       f"{latents.shape}.")

  def encode(self, images, train: bool = False):
    self._check_images(images)
    h = self.encoder(images, train)
    return conv1d(h, self.quant_layer).astype(jnp.float32)

  def decode_raw(self, latents, train: bool = False):
    """latents (B, W', C) -> (unclipped images float32, semantic map or None)."""
    self._check_latents(latents)
    t = conv1d(latents, self.post_quant_layer)
    images, sem = self.decoder(t, train)
    return images.astype(jnp.float32), sem

  def decode_all(self, latents, train: bool = False):
    """latents -> (unclipped images, semantic features (B, h, w, 768) or None)."""
    recon, sem = self.decode_raw(latents, train)
    if not self.semantic:
      return recon, None
    return recon, self.semantic_decoder(sem, train).astype(jnp.float32)

  def decode(self, latents):
    return jnp.clip(self.decode_raw(latents)[0], -1.0, 1.0)

  def __call__(self, images, train: bool = False, rng=None):
    mean = self.encode(images, train)
    z = mean if rng is None else sample_posterior(mean, rng, self.std)
    recon, sem = self.decode_all(z, train)
    aux = {"kl": jnp.mean(kl_loss(mean)), "mean": mean, "latents": z}
    if sem is not None:
      aux["semantic"] = sem
    return recon, aux


def build(cfg) -> EqTokenizer:
  """``config.model`` -> EqTokenizer (fields named as in the official
  ddconfig; unset ones take the class defaults). ``image_width`` (0 or unset:
  square) is read by ``example_inputs`` only. Raises ConfigError for an
  unknown key."""
  return EqTokenizer(**models.config_fields(cfg, EqTokenizer,
                                            ignore=("image_width",)))


def example_inputs(cfg, batch_size: int = 1):
  h = cfg.get("resolution", EqTokenizer.resolution)
  w = cfg.get("image_width", 0) or h
  return (jnp.zeros((batch_size, h, w, 3), jnp.float32),)

