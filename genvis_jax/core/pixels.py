"""Pixel value ranges: the maps between bytes, [0, 1] and [-1, 1], and the
official float -> uint8 conversions.

Images are bytes [0, 255], [0, 1] (MaskGIT VQGAN, torchvision ``ToTensor``,
the Inception and classifier inputs) or [-1, 1] (LlamaGen, FQGAN,
Equivariant). ``to_unit``, ``unit_to_signed`` and ``bytes_to_unit`` are plain
elementwise arithmetic on numpy or jax arrays (jitted models use them too).
Their constants are Python floats, which are weakly typed: a float32 input
computes in float32 and a bfloat16 one stays bfloat16. Each is the one
operation order its call sites used, so their results are bit-identical.

FID of a published number is computed on the official sampler's exact bytes,
and the three systems convert differently (``to_uint8``):

* "truncate" (RAR / MaskGIT VQGAN, images in [0, 1]; 1d-tokenizer
  ``demo_util.sample_fn``): ``(clamp(x, 0, 1) * 255).to(uint8)``, i.e. floor.
* "llamagen" (LlamaGen / FQGAN, [-1, 1]; ``sample_c2i_ddp.py``):
  ``clamp(127.5 * x + 128, 0, 255).to(uint8)`` (floor of x shifted by +0.5).
* "round" (Equivariant, [-1, 1]; ``generator/engine_generator.py``):
  ``x = (x + 1) / 2; round(clip(x * 255, 0, 255))`` with numpy's round
  (halves to even). A [0, 1] image is rounded as it is, as 1d-tokenizer's
  reconstruction evaluation does (``utils/train_utils.py``
  ``eval_reconstruction``: ``round(clamp(x, 0, 1) * 255)``). The training
  sample grids use it too (the nearest byte, whatever the system).

Conversions run in numpy float32 on the host, one operation at a time as the
official code does (a fused multiply-add on an accelerator could move a value
across an integer boundary).
"""

from __future__ import annotations

import numpy as np

from genvis_jax.errors import UserError

UNIT, SIGNED = (0.0, 1.0), (-1.0, 1.0)

UINT8_METHODS = ("truncate", "llamagen", "round")


class Uint8MethodError(UserError, ValueError):
  """Unknown uint8 conversion, or none known for a tokenizer."""


def to_unit(x, value_range):
  """Images in ``value_range`` (lo, hi) -> [0, 1]: ``(x - lo) / (hi - lo)``.

  Args:
    x: floating numpy or jax array, any shape; integer images are cast by
      the caller first (``bytes_to_unit`` for bytes).
    value_range: (lo, hi) with hi != lo, e.g. (0, 1) or (-1, 1).
  Returns:
    an array of ``x``'s shape and dtype. For (-1, 1) it is bit for bit
    ``(x + 1) / 2`` (subtracting -1 is adding 1); for (0, 1) it is ``x``.
  """
  lo, hi = (float(v) for v in value_range)
  return (x - lo) / (hi - lo)


def unit_to_signed(x):
  """[0, 1] -> [-1, 1]: ``2 * x - 1`` (the doubling is exact, so one
  rounding). Floating numpy or jax array; shape and dtype kept."""
  return 2.0 * x - 1.0


def bytes_to_unit(x):
  """uint8 [0, 255] (numpy or jax array, any shape) -> float32 [0, 1]:
  ``float32(x) / 255``, torchvision ``ToTensor``'s division in numpy (a
  multiply by a rounded 1 / 255 differs in the last bit for some bytes;
  XLA may compile the division that way)."""
  return x.astype(np.float32) / 255.0


def as_unit(images, value_range=UNIT) -> np.ndarray:
  """uint8 bytes (``bytes_to_unit``) or float images in ``value_range``
  (``to_unit``; (0, 1): unchanged) -> float32 numpy [0, 1], shape kept."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return bytes_to_unit(x)
  return to_unit(x.astype(np.float32), value_range)


def _rescale(x: np.ndarray, value_range, target) -> np.ndarray:
  """Images in ``value_range`` -> ``target`` (``UNIT`` or ``SIGNED``): ``x``
  itself if the ranges are equal (no arithmetic over a whole sample set),
  else ``to_unit`` and, for ``SIGNED``, ``unit_to_signed``."""
  if tuple(float(v) for v in value_range) == target:
    return x
  x = to_unit(x, value_range)
  return x if target == UNIT else unit_to_signed(x)


def to_uint8(images, value_range, method: str) -> np.ndarray:
  """Float images -> uint8 bytes as an official sampler writes them.

  Args:
    images: float numpy or fully addressable jax array (any shape, e.g.
      (N, H, W, 3)), nominally in ``value_range``; bf16 / fp16 are widened to
      float32 first. (A jax array spread over processes: gather it first,
      ``metrics.host_array``.)
    value_range: (lo, hi) of the images, (0, 1) or (-1, 1).
    method: "truncate" (RAR), "llamagen" (LlamaGen / FQGAN) or "round"
      (Equivariant; 1d-tokenizer's evaluation; training grids); formulas in
      the module docstring. "truncate" and "round" map ``value_range``
      onto (0, 1) (``to_unit``), "llamagen" onto (-1, 1).
  Returns:
    uint8 numpy array of the same shape.
  Raises:
    Uint8MethodError: unknown ``method``.
    TypeError: integer images (already bytes: scaling them again saturated
      every pixel above 0).
  """
  x = np.asarray(images)
  if x.dtype.kind in "iub":   # bf16 is kind "V"
    raise TypeError(f"to_uint8 takes float images, got {x.dtype} (already "
                    "bytes?).")
  x = x.astype(np.float32)
  if method == "truncate":
    x = _rescale(x, value_range, UNIT)
    return (np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
  if method == "llamagen":
    x = _rescale(x, value_range, SIGNED)
    y = np.float32(127.5) * x + np.float32(128.0)
    return np.clip(y, 0.0, 255.0).astype(np.uint8)
  if method == "round":
    x = _rescale(x, value_range, UNIT)   # (-1, 1): (x + 1) / 2, bit for bit
    return np.round(np.clip(x * np.float32(255.0), 0.0, 255.0)).astype(np.uint8)
  raise Uint8MethodError(f"Unknown uint8 conversion {method!r}; use one of "
                         f"{UINT8_METHODS} (config.tokenizer.uint8).")
