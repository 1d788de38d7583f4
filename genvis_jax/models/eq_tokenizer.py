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

The resolution levels and pixel-(un)shuffle resamplers are
``genvis_jax.models.layers.resample``, their res and attention blocks the
shared ones of ``genvis_jax.models.layers.resnet`` (reflect padding). Official -> Flax
names: ``genvis_jax.convert.eq.TOKENIZER_RENAMES``. The optional semantic
decoder (``semantic_decoder/down_{i}/block_{j}``) maps a decoder feature map
to 768-d features aligned with a frozen teacher; the official module also
holds a third, never-called block per level (``down.{i}.block.2``) that has no
counterpart here (the converter drops it).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers import images as images_lib
from genvis_jax.models.layers import resample


# --- columns <-> feature maps -----------------------------------------------------

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


# --- encoder / decoder ------------------------------------------------------------

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
    h = resample.conv2d(x, self.ch, "conv_in", **kw)
    n = len(self.ch_mult)
    for i, mult in enumerate(self.ch_mult):
      h = resample.level(self.ch * mult, self.num_res_blocks,
                attn=self.resolution // 2 ** i in self.attn_resolutions,
                resample="down" if i != n - 1 else None,
                factors=_factors(i, self.len_down_scale), dropout=self.dropout,
                remat=self.remat, name=f"down_{i}", **kw)(h, train)[0]
    h = resample.Mid(self.dropout, self.remat, name="mid", **kw)(h, train)
    h = nn.silu(layers.group_norm(uniform_guard=True, name="norm_out",
                                   **kw)(h))
    h = resample.conv2d(h, self.z_channels, "conv_out", **kw)
    t = columnize(h)
    return resample.conv1d(t, resample.conv1d_layer(t.shape[-1], "encoder1d", **kw))


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
    t = resample.conv1d(t, resample.conv1d_layer(t.shape[-1], "decoder1d", **kw))
    h = rasterize(t, self.z_channels)
    n = len(self.ch_mult)
    h = resample.conv2d(h, self.ch * self.ch_mult[-1], "conv_in", **kw)
    sem = h if self.semantic_map == "base" else None
    h = resample.Mid(self.dropout, self.remat, name="mid", **kw)(h, train)
    sem = h if self.semantic_map == "mid" else sem
    for i in reversed(range(n)):
      # Level i mirrors encoder level i - 1's resampling factors.
      h, pre = resample.level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                     attn=self.resolution // 2 ** i in self.attn_resolutions,
                     resample="up" if i != 0 else None,
                     factors=_factors(i - 1, self.len_down_scale),
                     dropout=self.dropout, remat=self.remat, name=f"up_{i}",
                     **kw)(h, train)
      if i == n - 1 and self.semantic_map == "res":
        sem = pre
    h = nn.silu(layers.group_norm(uniform_guard=True, name="norm_out",
                                   **kw)(h))
    return resample.conv2d(h, self.out_ch, "conv_out", **kw), sem


class SemanticDecoder(nn.Module):
  """Decoder feature map (B, h, w, C) -> (B, h, w, out_ch) semantic features
  in ``dtype`` (h and w halved at each of the first ``downsample_scale``
  levels; 0 here).

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
      h = resample.level(self.ch * mults[i + 1], self.num_res_blocks, attn=False,
                resample="down" if i < self.downsample_scale else None,
                dropout=self.dropout, remat=self.remat, name=f"down_{i}",
                **kw)(h, train)[0]
    h = nn.silu(layers.group_norm(uniform_guard=True, name="norm_out",
                                   **kw)(h))
    return resample.conv2d(h, self.out_ch, "conv_out", **kw)


def sample_posterior(mean, rng, std: float = 2.5):
  """sigma-VAE sample: ``mean + s * eps``, one ``s ~ N(0, (std/0.8)^2)`` per
  image clamped to ``[-std, std]``, eps ~ N(0, 1) per element. mean (B, L, C)
  -> (B, L, C) (float32 for a float32 mean)."""
  k_s, k_e = jax.random.split(rng)
  s = jax.random.normal(k_s, (mean.shape[0],), jnp.float32) * (std / 0.8)
  s = jnp.clip(s, -std, std).reshape((-1,) + (1,) * (mean.ndim - 1))
  return mean + s * jax.random.normal(k_e, mean.shape, jnp.float32)


def kl_loss(mean):
  """Per-image "KL" of the sigma-VAE: 0.5 * sum(mean^2). (B, L, C) -> (B,)
  float32, >= 0."""
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
  ``decode(latents)`` -> images (B, H, W' * token_width, 3) float32 clipped
  to [-1, 1].

  Raises ``ValueError`` for images that are not (B, H, W, 3) or latents not
  (B, W', embed_dim); ``ConfigError`` for H != ``resolution``, W not a
  multiple of ``token_width``, or a ``resolution`` that
  2**(len(ch_mult) - 1) does not divide.
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
    """Rows of the encoder's feature map: resolution / 2**(len(ch_mult) - 1)."""
    return self.resolution // 2 ** (len(self.ch_mult) - 1)

  @property
  def post_channels(self) -> int:
    """Features per column of the Conv1d stack: z_channels * latent_height."""
    return self.z_channels * self.latent_height

  def setup(self):
    if self.resolution % 2 ** (len(self.ch_mult) - 1):
      raise errors.ConfigError(
          f"config.model.resolution {self.resolution} must be divisible "
          f"by 2**{len(self.ch_mult) - 1} (len(config.model.ch_mult) - 1).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cnn = dict(ch=self.ch, ch_mult=tuple(self.ch_mult),
               num_res_blocks=self.num_res_blocks,
               attn_resolutions=tuple(self.attn_resolutions),
               resolution=self.resolution, z_channels=self.z_channels,
               len_down_scale=self.len_down_scale, dropout=self.dropout,
               remat=self.remat, **kw)
    self.encoder = Encoder1D(**cnn)
    self.quant_layer = resample.conv1d_layer(self.embed_dim, "quant_layer", **kw)
    self.post_quant_layer = resample.conv1d_layer(self.post_channels, "post_quant_layer",
                                         **kw)
    self.decoder = Decoder1D(out_ch=3, semantic_map=self.semantic_map, **cnn)
    if self.semantic:
      self.semantic_decoder = SemanticDecoder(
          self.semantic_ch, self.semantic_out, tuple(self.semantic_ch_mult),
          self.semantic_res_blocks, dropout=self.dropout, remat=self.remat,
          **kw)

  def _check_images(self, images):
    images_lib.check_images(images)
    _, h, w, _ = images.shape
    if h != self.resolution:
      raise errors.ConfigError(
          f"Image height {h} != config.model.resolution {self.resolution}: the "
          f"column tokenizer has a fixed height (its Conv1d sees "
          f"{self.post_channels} = z_channels * height/16 features); resize "
          f"or crop to height {self.resolution}.")
    if w % self.token_width:
      raise errors.ConfigError(
          f"Image width {w} is not a multiple of the token width "
          f"{self.token_width} px; crop or pad the width.")

  def _check_latents(self, latents):
    if latents.ndim != 3 or latents.shape[-1] != self.embed_dim:
      raise ValueError(f"Expected latents (B, columns, {self.embed_dim}), got "
                       f"{latents.shape}.")

  def encode(self, images, train: bool = False):
    """images (B, H, W, 3) in [-1, 1] -> posterior mean (B, W / token_width,
    embed_dim) float32."""
    self._check_images(images)
    h = self.encoder(images, train)
    return resample.conv1d(h, self.quant_layer).astype(jnp.float32)

  def decode_raw(self, latents, train: bool = False):
    """latents (B, W', C) -> (unclipped images float32, semantic map or None)."""
    self._check_latents(latents)
    t = resample.conv1d(latents, self.post_quant_layer)
    images, sem = self.decoder(t, train)
    return images.astype(jnp.float32), sem

  def decode_all(self, latents, train: bool = False):
    """latents -> (unclipped images, semantic features (B, h, w, 768) or None)."""
    recon, sem = self.decode_raw(latents, train)
    if not self.semantic:
      return recon, None
    return recon, self.semantic_decoder(sem, train).astype(jnp.float32)

  def decode(self, latents):
    """latents (B, W', embed_dim) -> images (B, H, W' * token_width, 3)
    float32 in [-1, 1]."""
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
  unknown key, ``semantic_map``, channel widths GroupNorm cannot split, or an
  ``attn_resolutions`` entry that is no level's height."""
  model = EqTokenizer(**models.config_fields(cfg, EqTokenizer,
                                             ignore=("image_width",)))
  layers.check_groups("ch", model.ch, "ch_mult", model.ch_mult)
  if model.semantic:   # its levels' widths: ch x ch_mult[1:], then out_ch
    layers.check_groups("semantic_ch", model.semantic_ch, "semantic_ch_mult",
                        model.semantic_ch_mult, first=1)
  levels = [model.resolution // 2 ** i for i in range(len(model.ch_mult))]
  stray = sorted(set(model.attn_resolutions) - set(levels))
  if stray:   # matched no level: silently a model without attention there
    raise errors.ConfigError(
        f"config.model.attn_resolutions={tuple(model.attn_resolutions)} "
        f"lists {stray}, which is no level's feature-map height: with "
        f"resolution={model.resolution} and {len(levels)} levels (ch_mult) "
        f"the levels are {levels}; list some of those, or () for no "
        f"attention.")
  if model.semantic_map not in SEMANTIC_MAPS:
    raise errors.ConfigError(
        f"config.model.semantic_map={model.semantic_map!r} is not a decoder "
        f"tap; use one of {SEMANTIC_MAPS}.")
  return model


# Where the semantic decoder taps the decoder (official semantic_map).
SEMANTIC_MAPS = ("base", "mid", "res")


def example_inputs(cfg, batch_size: int = 1):
  """(images f32 zeros (batch_size, resolution, image_width or resolution,
  3),): the argument of ``EqTokenizer.__call__``."""
  h = cfg.get("resolution", EqTokenizer.resolution)
  w = cfg.get("image_width", 0) or h
  return (jnp.zeros((batch_size, h, w, 3), jnp.float32),)

