"""Pixel value ranges: the official float -> uint8 conversions.

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


def _rescale(x: np.ndarray, value_range, target) -> np.ndarray:
  """Images in ``value_range`` -> ``target`` (``UNIT`` or ``SIGNED``): ``x``
  itself if the ranges are equal (no arithmetic over a whole sample set),
  else ``(x - lo) / (hi - lo)`` and, for ``SIGNED``, ``2 * x - 1``."""
  lo, hi = (float(v) for v in value_range)
  if (lo, hi) == target:
    return x
  x = (x - lo) / (hi - lo)
  return x if target == UNIT else 2.0 * x - 1.0


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
      onto (0, 1), "llamagen" onto (-1, 1).
  Returns:
    uint8 numpy array of the same shape.
  Raises:
    Uint8MethodError: unknown ``method``.
  """
  x = np.asarray(images).astype(np.float32)
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
