"""The training grids' uint8 conversion (``genvis_jax.core.pixels``)."""

import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.core import pixels
from genvis_jax.train.tasks import Task


def _floats(lo, hi):
  """Every byte level of (lo, hi) and its float32 neighbours, random values
  a little past both ends, and the ends themselves, float32 (N,)."""
  k = np.arange(256, dtype=np.float64) / 255
  u = np.concatenate([k, (k + 0.5 / 255)])
  u = np.concatenate([u, np.nextafter(u, 2), np.nextafter(u, -2),
                      np.random.default_rng(0).uniform(-0.05, 1.05, 20000)])
  return (lo + u * (hi - lo)).astype(np.float32)


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_training_grids_show_the_nearest_byte(value_range):
  """``Task.grid_uint8``: the image mapped onto [0, 1], times 255, rounded
  (halves to even) and clipped; a jax array in, host uint8 out."""
  lo, hi = value_range
  x = _floats(lo, hi)
  x = x[:x.size // 12 * 12].reshape(-1, 2, 2, 3)
  task = Task(None)
  task.value_range = value_range
  got = task.grid_uint8(jnp.asarray(x))
  want = np.clip(np.round((x - np.float32(lo)) / np.float32(hi - lo)
                          * np.float32(255.0)), 0, 255).astype(np.uint8)
  assert isinstance(got, np.ndarray) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  # Not the sampler's floor: the grid of a [0, 1] image differs from it.
  if value_range == (0.0, 1.0):
    assert not np.array_equal(got, pixels.to_uint8(x, value_range,
                                                   "truncate"))
