"""The FID InceptionV3 (TensorFlow's 2015-12-05 network) in Flax, NHWC.

Structure of pytorch-fid's ``fid_inception_v3``: torchvision's Inception3 with
the FID patches (average pools that do not count the zero padding in Mixed_5*,
Mixed_6b-e and Mixed_7b; a max pool in Mixed_7c's pool branch), 1008 classes,
no auxiliary head. Module names follow the PyTorch ones (``Mixed_6d/branch1x1/
conv``) so converting ``pt_inception-2015-12-05-6726825d.pth`` is a renaming
plus a transpose (``genvis_jax/convert/inception.py``, which also reads the
weight files: ``load_inception_params``). Feature extraction over devices:
``genvis_jax/evaluate/inception.py``.

Outputs (what the ADM evaluator reads from the TF graph):
  pool    (B, 2048)  final average pool (TF ``pool_3:0``): FID, precision/recall.
  spatial (B, 2023)  ``Mixed_6d.branch1x1`` after ReLU (TF ``mixed_6/conv:0``),
                     first 7 channels, (17, 17, 7) flattened in HWC order: sFID.
  logits  (B, 1008)  ``pool @ fc/kernel`` WITHOUT the bias: ADM's Inception Score
                     multiplies by the ``softmax/logits/MatMul`` weight only.

Preprocessing (``preprocess=``):
  "pytorch_fid"  bilinear resize to 299 with half-pixel centres (PyTorch
                 ``align_corners=False``, no antialias), then ``2x - 1``.
  "adm_tf"       what the TF graph does to ADM's [0, 255] input: legacy TF
                 ``ResizeBilinear`` (no half-pixel offset) then ``(v - 128) / 128``.
Inputs are float images in [0, 1] or uint8 in [0, 255], any size.
"""

from __future__ import annotations

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax import models
from genvis_jax.core import pixels
from genvis_jax.models import layers
from genvis_jax.models.layers import images as images_lib

PREPROCESS = ("pytorch_fid", "adm_tf")
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7


# --- preprocessing -------------------------------------------------------------

def resize_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
  """(out_size, in_size) float32 weights of 1-D bilinear interpolation.

  ``half_pixel=True``: PyTorch ``align_corners=False`` (source coordinate
  ``(i + 0.5) * in / out - 0.5`` clamped at 0). ``False``: TF1's legacy
  ``ResizeBilinear`` (source ``i * in / out``). Both clamp the upper neighbour
  and compute the coordinate and its fraction in float32, as both kernels
  do (``scale = (float) in / out``: TF's ``resize_bilinear_op.cc``
  ``LegacyScaler``, PyTorch's ``area_pixel_compute_source_index``); in
  float64 the weights differed from TF's by up to 9e-6.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  src = (dst + f32(0.5)) * scale - f32(0.5) if half_pixel else dst * scale
  src = np.maximum(src, f32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(f32)).astype(np.float64)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x: jax.Array, size: int, half_pixel: bool) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) separable bilinear (no antialias),
  float32 for float32 x; x itself when already size x size."""
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x
  return images_lib.resize_separable(x, resize_matrix(h, size, half_pixel),
                                     resize_matrix(w, size, half_pixel))


def preprocess_images(images: jax.Array, size: int = 299,
                      mode: str = "pytorch_fid") -> jax.Array:
  """[0, 1] float or uint8 (B, H, W, 3) -> network input (B, size, size, 3)
  float32: [-1, 1] for "pytorch_fid", (v - 128) / 128 of v in [0, 255] for
  "adm_tf" (resized in [0, 255], as ADM's graph: uint8 bytes exactly, not
  through x / 255 and back). Raises ``ValueError`` for another ``mode`` or
  images that are not (B, H, W, 3)."""
  if mode not in PREPROCESS:
    raise ValueError(f"Unknown Inception preprocess {mode!r}; choose one of "
                     f"{PREPROCESS}.")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Inception needs NHWC RGB images, got shape {images.shape}.")
  if mode == "adm_tf":
    x = (images.astype(jnp.float32) if images.dtype == jnp.uint8
         else images.astype(jnp.float32) * 255.0)
    return (resize_bilinear(x, size, half_pixel=False) - 128.0) / 128.0
  x = (pixels.bytes_to_unit(images) if images.dtype == jnp.uint8
       else images.astype(jnp.float32))
  return pixels.unit_to_signed(resize_bilinear(x, size, half_pixel=True))


# --- layers --------------------------------------------------------------------

class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm with the running statistics stored as params.

  Params (C,): ``scale``, ``bias``, ``mean``, ``var`` (PyTorch weight, bias,
  running_mean, running_var). eps 1e-3 as torchvision's BasicConv2d.
  """
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    p = lambda name, init: self.param(name, layers.named(init, ("norm",)), (c,),
                                      jnp.float32)
    scale, bias = p("scale", layers.ones), p("bias", layers.zeros)
    mean, var = p("mean", layers.zeros), p("var", layers.ones)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class BasicConv(nn.Module):
  """conv (no bias) -> frozen BN -> ReLU; ``padding`` (ph, pw) symmetric."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = layers.conv(self.features, self.kernel, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _conv(x, name, features, kernel, strides=1, padding=(0, 0)):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv(features, kernel, strides, padding, name=name)(x)


def _avg_pool_3x3(x):
  # TF's average pool ignores the zero padding (pytorch-fid's patch).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


# --- Inception blocks (torchvision names) ----------------------------------------

class InceptionA(nn.Module):
  """35x35 block (Mixed_5b-d): (B, h, w, C) -> (B, h, w, 224 +
  pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(x, "branch1x1", 64, 1)
    b5 = _conv(_conv(x, "branch5x5_1", 48, 1), "branch5x5_2", 64, 5, padding=2)
    b3 = _conv(x, "branch3x3dbl_1", 64, 1)
    b3 = _conv(b3, "branch3x3dbl_2", 96, 3, padding=1)
    b3 = _conv(b3, "branch3x3dbl_3", 96, 3, padding=1)
    bp = _conv(_avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (Mixed_6a): (B, 35, 35, C) -> (B, 17, 17, 480 + C)."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(x, "branch3x3", 384, 3, strides=2)
    bd = _conv(x, "branch3x3dbl_1", 64, 1)
    bd = _conv(bd, "branch3x3dbl_2", 96, 3, padding=1)
    bd = _conv(bd, "branch3x3dbl_3", 96, 3, strides=2)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block; returns (output (B, h, w, 768), branch1x1 (B, h, w, 192))
  since sFID taps Mixed_6d's 1x1."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(x, "branch1x1", 192, 1)
    b7 = _conv(x, "branch7x7_1", c7, 1)
    b7 = _conv(b7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
    b7 = _conv(b7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
    bd = _conv(x, "branch7x7dbl_1", c7, 1)
    bd = _conv(bd, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
    bd = _conv(bd, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
    bd = _conv(bd, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
    bd = _conv(bd, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
    bp = _conv(_avg_pool_3x3(x), "branch_pool", 192, 1)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """17 -> 8 reduction (Mixed_7a): (B, 17, 17, C) -> (B, 8, 8, 512 + C)."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(_conv(x, "branch3x3_1", 192, 1), "branch3x3_2", 320, 3, strides=2)
    b7 = _conv(x, "branch7x7x3_1", 192, 1)
    b7 = _conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    b7 = _conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    b7 = _conv(b7, "branch7x7x3_4", 192, 3, strides=2)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block; ``max_pool=True`` is FIDInceptionE_2 (Mixed_7c):
  (B, h, w, C) -> (B, h, w, 2048)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = _conv(x, "branch1x1", 320, 1)
    b3 = _conv(x, "branch3x3_1", 384, 1)
    b3 = jnp.concatenate([
        _conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
        _conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0))], axis=-1)
    bd = _conv(x, "branch3x3dbl_1", 448, 1)
    bd = _conv(bd, "branch3x3dbl_2", 384, 3, padding=1)
    bd = jnp.concatenate([
        _conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
        _conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = _conv(pooled, "branch_pool", 192, 1)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """images (B, H, W, 3) in [0, 1] (or uint8) -> {"pool", "spatial", "logits"}.

  See the module docstring for the three outputs (float32 (B, 2048),
  (B, 2023), (B, 1008) at 299 px) and ``preprocess``.
  ``resize`` is 299 for real use (smaller sizes >= 75 only for quick checks;
  ``spatial`` then has a different length). Raises ``ValueError`` for an
  unknown ``preprocess`` or images that are not (B, H, W, 3).
  """
  preprocess: str = "pytorch_fid"
  resize: int = 299

  @nn.compact
  def __call__(self, images):
    x = preprocess_images(images, self.resize, self.preprocess)
    x = _conv(x, "Conv2d_1a_3x3", 32, 3, strides=2)
    x = _conv(x, "Conv2d_2a_3x3", 32, 3)
    x = _conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = _max_pool_3x3_s2(x)
    x = _conv(x, "Conv2d_3b_1x1", 80, 1)
    x = _conv(x, "Conv2d_4a_3x3", 192, 3)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, tap = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    spatial = tap[..., :SPATIAL_CHANNELS].reshape(tap.shape[0], -1)
    return {"pool": pool, "spatial": spatial,
            "logits": Logits(name="fc")(pool)}


class Logits(nn.Module):
  """``pool @ kernel`` (2048, 1008): (B, 2048) -> (B, 1008) float32. The bias
  is a parameter (complete conversion) but not added: ADM's IS uses the TF
  graph's MatMul alone."""

  @nn.compact
  def __call__(self, pool):
    kernel = self.param("kernel", layers.named(layers.default_kernel_init,
                                               ("embed", "vocab")),
                        (pool.shape[-1], NUM_CLASSES), jnp.float32)
    self.param("bias", layers.named(layers.zeros, ("vocab",)), (NUM_CLASSES,),
               jnp.float32)
    return jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)


# --- construction / loading ------------------------------------------------------

def build(cfg) -> FIDInceptionV3:
  """``config.model.name = "inception"``: fields ``preprocess``, ``resize``."""
  return FIDInceptionV3(**models.config_fields(cfg, FIDInceptionV3))


def example_inputs(cfg, batch_size: int = 1):
  """(images f32 zeros (batch_size, 299, 299, 3),): the network's input."""
  del cfg
  return (jnp.zeros((batch_size, 299, 299, 3), jnp.float32),)


def init_inception_params(rng=None, resize: int = 299) -> dict:
  """Random parameters (tests, ``jax.eval_shape`` of the expected tree)."""
  rng = jax.random.key(0) if rng is None else rng
  model = FIDInceptionV3(resize=resize)
  params = model.init(rng, jnp.zeros((1, resize, resize, 3)))["params"]
  return nn.unbox(params)


def abstract_inception_params():
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
  return jax.eval_shape(init_inception_params)


def flatten_params(params) -> dict[str, np.ndarray]:
  """Nested params -> {"Mixed_5b/branch1x1/conv/kernel": array} (for .npz)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = np.asarray(leaf)
  return out


def untrained(params) -> bool:
  """True when every batch-norm statistic of Inception ``params`` is at its
  initial value (means 0, variances 1): random stand-in weights (the tests'
  and the README's ``write_random_inception``), never pytorch-fid's FID
  Inception, whose running statistics are trained."""
  flat = flatten_params(params)
  stats = [(k, v) for k, v in flat.items() if k.endswith(("/mean", "/var"))]
  return bool(stats) and all(
      np.all(np.asarray(v) == (0.0 if k.endswith("/mean") else 1.0))
      for k, v in stats)


def weights_fingerprint(params) -> str:
  """A short hex id of Inception parameters (sha256 of names, shapes and
  float32 bytes in sorted order): equal for the same weights however they were
  loaded (.pth, .npz, converted directory); references record it."""
  h = hashlib.sha256()
  for name, value in sorted(flatten_params(params).items()):
    value = np.ascontiguousarray(value, np.float32)
    h.update(f"{name}:{value.shape};".encode())
    h.update(value.tobytes())
  return h.hexdigest()[:16]
