"""The pixel-range maps (``genvis_jax.core.pixels``): bit for bit the inline
formulas they replaced, in numpy and in a jitted program, keeping the dtype;
the training grids' uint8 conversion."""

import jax
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


def _bits(a):
  a = np.asarray(a)
  return a.dtype, a.view(np.uint8 if a.dtype.itemsize == 1 else
                         f"u{a.dtype.itemsize}")


def _same_bits(a, b):
  (da, ba), (db, bb) = _bits(a), _bits(b)
  assert da == db
  np.testing.assert_array_equal(ba, bb)


@pytest.mark.parametrize("run", ["numpy", "jit"])
def test_to_unit_of_signed_images_is_x_plus_1_over_2(run):
  """The replaced ``(x + 1) / 2`` (Equivariant uint8, DINO inputs) and
  ``(x - lo) / (hi - lo)`` with float32 constants (rFID's [0, 1] images)."""
  x = _floats(-1.0, 1.0)
  if run == "numpy":
    got = pixels.to_unit(x, (-1, 1))
    _same_bits(got, (x + np.float32(1.0)) / np.float32(2.0))
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0), (0.0, 255.0), (-0.5, 0.7)):
      y = _floats(lo, hi)
      _same_bits(pixels.to_unit(y, (lo, hi)),
                 (y - np.float32(lo)) / np.float32(hi - lo))
  else:
    got = jax.jit(lambda v: pixels.to_unit(v, pixels.SIGNED))(x)
    _same_bits(got, jax.jit(lambda v: (v + 1.0) / 2.0)(x))


@pytest.mark.parametrize("run", ["numpy", "jit"])
def test_unit_to_signed_is_2x_minus_1_in_the_input_dtype(run):
  """The replaced ``x * 2.0 - 1.0`` of the classifier (its compute dtype,
  bf16 included), Inception and LPIPS."""
  x = _floats(0.0, 1.0)
  for dtype in (jnp.float32, jnp.bfloat16):
    v = jnp.asarray(x, dtype)
    if run == "numpy" and dtype == jnp.float32:
      _same_bits(pixels.unit_to_signed(x), x * 2.0 - 1.0)
    f = (jax.jit(pixels.unit_to_signed) if run == "jit"
         else pixels.unit_to_signed)
    got = f(v)
    assert got.dtype == dtype
    _same_bits(got, jax.jit(lambda a: a * 2.0 - 1.0)(v))
    assert pixels.to_unit(v, pixels.SIGNED).dtype == dtype


def test_bytes_to_unit_divides_by_255_in_float32():
  """torchvision ``ToTensor`` in numpy (the data pipeline, rFID, FID): a
  division, not a multiply by 1 / 255, which differs in the last bit for
  some bytes. Jitted (Inception's uint8 input) it is the replaced
  ``x.astype(float32) / 255.0`` (XLA may itself turn that division into
  the multiply)."""
  k = np.arange(256, dtype=np.uint8).reshape(16, 16)
  got = pixels.bytes_to_unit(k)
  _same_bits(got, k.astype(np.float32) / np.float32(255.0))
  assert not np.array_equal(got, k.astype(np.float32) * np.float32(1 / 255))
  _same_bits(jax.jit(pixels.bytes_to_unit)(jnp.asarray(k)),
             jax.jit(lambda v: v.astype(jnp.float32) / 255.0)(jnp.asarray(k)))


def test_to_uint8_refuses_bytes():
  # Scaled again, bytes saturated: [0, 10, 128, 255] -> [0, 255, 255, 255].
  with pytest.raises(TypeError, match="float images, got uint8"):
    pixels.to_uint8(np.array([0, 10, 128, 255], np.uint8), (0, 1), "truncate")
  assert pixels.to_uint8(np.ones(2, jnp.bfloat16), (0, 1), "round").tolist() == [
      255, 255]


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
