"""LPIPS perceptual distance (VGG16 variant, "lin" heads), NHWC, local weights only.

d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), with f_l the VGG16
features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the ImageNet-scaled
input, n(.) unit-normalisation over channels (eps 1e-10) and w_l >= 0 the learned
1x1 linear heads (no bias). Inputs are first mapped to [-1, 1] (what LPIPS was
trained on), then shifted/scaled by LPIPS's ScalingLayer constants.

Nothing downloads: ``genvis_jax.convert.lpips.load_lpips_params(path)`` reads
a local ``.npz``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax.core import pixels
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype

# torchvision vgg16.features indices of the 13 convs, grouped into LPIPS slices
# (slice k ends at the ReLU whose output is tapped); a 2x2 max-pool precedes
# slices 2..5.
VGG_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _max_pool_2x2(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _unit_normalize(x, eps=1e-10):
  # The floor inside sqrt keeps gradients finite for all-zero ReLU vectors; its
  # effect on the value is far below eps.
  ss = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / (jnp.sqrt(jnp.maximum(ss, 1e-30)) + eps)


class LPIPS(nn.Module):
  """(B, H, W, 3) pair in [-1, 1] -> (B,) float32 distances.

  Parameters: ``features_{idx}/{kernel,bias}`` (VGG16 convs, torchvision index)
  and ``lin_{k}/kernel`` (1, 1, C_k, 1) for k = 0..4. Raises ``ValueError``
  unless x and y are NHWC RGB batches of one shape.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got "
                       f"{x.shape} and {y.shape}.")
    scale = lambda v: (v.astype(jnp.float32) - SHIFT) / SCALE
    b = x.shape[0]
    h = jnp.concatenate([scale(x), scale(y)], axis=0)
    total = jnp.zeros((b,), jnp.float32)
    for s, idxs in enumerate(VGG_SLICES):
      if s:
        h = _max_pool_2x2(h)
      for idx in idxs:
        h = layers.conv(VGG_WIDTHS[s], 3, dtype=self.dtype,
                        name=f"features_{idx}")(h)
        h = nn.relu(h)
      f = _unit_normalize(h.astype(jnp.float32))
      diff = jnp.square(f[:b] - f[b:])
      lin = layers.conv(1, 1, use_bias=False, dtype=self.dtype,
                        name=f"lin_{s}")
      total = total + jnp.mean(lin(diff).astype(jnp.float32), axis=(1, 2, 3))
    return total


_RANGES = ((0.0, 1.0), (-1.0, 1.0))


def lpips_distance(params, x: jax.Array, y: jax.Array, *,
                   value_range: tuple[float, float] = (0.0, 1.0),
                   dtype: Dtype = jnp.float32) -> jax.Array:
  """LPIPS distance per image.

  Args:
    params: from ``convert.lpips.load_lpips_params`` (not trained: wrap in stop_gradient).
    x, y: (B, H, W, 3) images in ``value_range``: (0, 1) (default, MaskGIT's
      range) is mapped to [-1, 1]; (-1, 1) is used as is.
    dtype: conv compute dtype (bfloat16 saves memory in training).
  Returns:
    (B,) float32.
  Raises:
    ValueError: another ``value_range``, or x, y not (B, H, W, 3) of one shape.
  """
  value_range = tuple(float(v) for v in value_range)
  if value_range not in _RANGES:
    raise ValueError(f"value_range must be one of {_RANGES}, got {value_range}.")
  if value_range == (0.0, 1.0):
    x, y = pixels.unit_to_signed(x), pixels.unit_to_signed(y)
  return LPIPS(dtype=dtype).apply({"params": params}, x, y)
