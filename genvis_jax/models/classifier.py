"""A small CNN classifier for the demo data.

Used to score class-conditional samples (how often the conditioning class is
recognised) and as the feature network of the demo-scale FID. Also the fastest
model through the shared trainer, so the trainer tests use it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.core import pixels
from genvis_jax.models import layers


class Classifier(nn.Module):
  """images (B, H, W, 3) in [0, 1] -> float32 logits (B, num_classes).

  ``features(images)`` returns the pooled (B, widths[-1]) float32 features.
  """
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)
  dtype: str = "float32"

  def setup(self):
    # No conv bias: the GroupNorm right after removes it (and Adam would
    # turn its zero gradient's round-off into updates).
    self.convs = [layers.conv(w, 3, use_bias=False, name=f"conv_{i}",
                              dtype=self.dtype)
                  for i, w in enumerate(self.widths)]
    self.norms = [layers.group_norm(min(8, w), 1e-5, name=f"norm_{i}",
                                    dtype=self.dtype)
                  for i, w in enumerate(self.widths)]
    self.head = layers.dense(self.num_classes, ("embed", "vocab"), name="head")

  def features(self, images):
    x = pixels.unit_to_signed(images.astype(self.dtype))
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nn.silu(norm(conv(x)))
      if i < len(self.convs) - 1:
        x = nn.avg_pool(x, (2, 2), (2, 2))
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)

  def __call__(self, images, train: bool = False):
    del train
    return self.head(self.features(images))


def build(cfg) -> Classifier:
  """``config.model`` -> Classifier; ``image_size`` is read by
  ``example_inputs`` only. Raises ConfigError for an unknown key."""
  return Classifier(**models.config_fields(cfg, Classifier,
                                           ignore=("image_size",)))


def example_inputs(cfg, batch_size: int = 1):
  """(images f32 zeros (batch_size, image_size, image_size, 3),)."""
  s = cfg.get("image_size", 32)
  return (jnp.zeros((batch_size, s, s, 3), jnp.float32),)

