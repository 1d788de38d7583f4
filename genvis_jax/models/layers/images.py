"""Image tensors as the models take them: input checks, the example input
of square-image models, ImageNet normalisation, and torch's bicubic and
area resizes reproduced exactly as (out, in) matrices (DINOv2's position
table and teacher inputs, the DINO discriminator's inputs).

Shared by the tokenizers (LlamaGen VQ, FQGAN, MaskGIT VQGAN), the DINOv2
teacher and the DINO discriminator; written once here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import errors
from genvis_jax.core import pixels


# --- checks and example inputs ----------------------------------------------

def check_images(images, image_size: int | None = None, factor: int = 1):
  """Clear errors for non-NHWC-RGB inputs or sizes the model cannot take.

  Raises ``TypeError`` for integer images (uint8 bytes read as values up to
  255 gave codes without a word); ``ValueError`` unless images are (B, H, W,
  3); ``ConfigError`` unless ``factor`` divides H and W and H = W =
  ``image_size`` (when given)."""
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
        f"Expected float images, got {images.dtype}: convert bytes first "
        "(genvis_jax.core.pixels.bytes_to_unit -> [0, 1], then "
        "unit_to_signed for the tokenizers that take [-1, 1]).")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected NHWC RGB images (B, H, W, 3), got shape "
                     f"{images.shape}.")
  h, w = images.shape[1:3]
  if image_size is not None and (h, w) != (image_size, image_size):
    raise errors.ConfigError(
        f"This tokenizer takes {image_size}x{image_size} images "
        f"(its adapters' positional tables are sized to the "
        f"{image_size // factor}^2 grid), got {h}x{w}; resize or "
        f"crop the images, or set model.image_size.")
  if h % factor or w % factor:
    raise errors.ConfigError(
        f"Image size {h}x{w} is not divisible by the downsampling factor "
        f"{factor}; crop or resize to a multiple of it (config.data.image_size).")


def check_codes(codes, name="codes"):
  """Raises ``ValueError`` unless ``codes`` is a (B, h, w) grid (``name`` is
  named in the message)."""
  if codes.ndim != 3:
    raise ValueError(f"Expected a (B, h, w) code grid for {name}, got shape "
                     f"{codes.shape}; reshape flat tokens to (B, h, w).")


def square_inputs(cfg, batch_size: int = 1):
  """(zeros (batch_size, image_size, image_size, 3) float32,): the input of
  every square-image tokenizer (LlamaGen, FQGAN, MaskGIT)."""
  size = cfg.get("image_size", 256)
  return (jnp.zeros((batch_size, size, size, 3), jnp.float32),)


# --- ImageNet normalisation ---------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def normalize_signed(images):
  """[-1, 1] images (B, H, W, 3) -> [0, 1] -> ImageNet mean/std, float32,
  ``((x + 1) / 2 - mean) / std`` in that order: the input of the
  Equivariant DINOv2 teacher (official ``preprocess_raw_image``) and of the
  DINO discriminator (``FrozenDINOSmallNoDrop.forward``) before their
  resizes."""
  x = pixels.to_unit(images.astype(jnp.float32), pixels.SIGNED)
  return ((x - jnp.asarray(IMAGENET_MEAN, jnp.float32))
          / jnp.asarray(IMAGENET_STD, jnp.float32))


# --- torch resizes as matrices ------------------------------------------------

def _cubic(x, a):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_matrix(in_size: int, out_size: int, *, scale_factor=None,
                   antialias: bool = False) -> np.ndarray:
  """(out, in) float64 matrix M with ``M @ v`` = torch's 1-D
  ``F.interpolate(mode="bicubic", align_corners=False)`` of v.

  ``scale_factor`` (when given) maps coordinates as torch does for a given
  scale factor: src = (dst + 0.5) / scale_factor - 0.5. Without antialias:
  Keys cubic a = -0.75, 4 taps, out-of-range taps clamped to the border. With
  antialias: a = -0.5 filter stretched by the scale when shrinking, taps
  inside the input only, weights normalised to sum 1 (torch's AA kernel, which
  copies an axis whose size does not change, whatever the scale factor).
  """
  scale = 1.0 / scale_factor if scale_factor else in_size / out_size
  m = np.zeros((out_size, in_size))
  dst = np.arange(out_size)
  if not antialias:
    src = scale * (dst + 0.5) - 0.5
    x0 = np.floor(src)
    t = src - x0
    for k, w in enumerate(_cubic(np.stack([t + 1, t, 1 - t, 2 - t]), -0.75)):
      np.add.at(m, (dst, np.clip(x0.astype(int) - 1 + k, 0, in_size - 1)), w)
    return m
  if in_size == out_size:
    return np.eye(in_size)
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  for i in dst:
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    m[i, lo:hi] = w / w.sum()
  return m



def resize_separable(x, mh, mw):
  """(B, H, W, C) -> (B, h, w, C) float32 through per-axis matrices mh (h, H)
  and mw (w, W), at HIGHEST precision (e.g. :func:`bicubic_matrix`)."""
  mh, mw = (jnp.asarray(m, jnp.float32) for m in (mh, mw))
  return jnp.einsum("ih,bhwc,jw->bijc", mh, x.astype(jnp.float32), mw,
                    precision=jax.lax.Precision.HIGHEST)


def resize_bicubic(x, height: int, width: int):
  """torch ``F.interpolate(mode='bicubic', align_corners=False)`` (a = -0.75,
  no antialias) of (B, H, W, C) to (B, height, width, C), float32."""
  return resize_separable(x, bicubic_matrix(x.shape[1], height),
                          bicubic_matrix(x.shape[2], width))


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix M with ``M @ v`` = torch's 1-D
  ``F.interpolate(mode='area')`` (adaptive average pooling) of v: output i
  averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    lo, hi = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def resize_area(x, height: int, width: int):
  """(B, H, W, C) -> (B, height, width, C) torch 'area' resize, float32 (one
  box matrix per axis; identity where a size does not change)."""
  return resize_separable(x, area_matrix(x.shape[1], height),
                          area_matrix(x.shape[2], width))
