"""Sample images: each tokenizer's official uint8 conversion, PNG grids, npz
batches.

The conversions themselves (their formulas and sources) are
``genvis_jax.core.pixels.to_uint8``; ``uint8_method`` picks a tokenizer's.
"""

from __future__ import annotations

import zipfile
from typing import Iterable

import numpy as np

from genvis_jax.core import files
from genvis_jax.core import metrics
from genvis_jax.core import pixels

# Tokenizer model name -> its official sampler's conversion.
DEFAULT_UINT8 = {
    "maskgit_vqgan": "truncate",
    "llamagen_vq": "llamagen",
    "fqgan": "llamagen",
    "eq_tokenizer": "round",
}


def uint8_method(tok) -> str:
  """``config.tokenizer`` -> its conversion: ``tok.uint8`` if set, else the
  official one of ``tok.model.name`` (``DEFAULT_UINT8``).

  Raises ``pixels.Uint8MethodError`` for an unknown method, or a tokenizer
  with no official default and no ``tok.uint8``.
  """
  method = tok.get("uint8", "") or DEFAULT_UINT8.get(tok.model.name, "")
  if not method:
    raise pixels.Uint8MethodError(
        f"No official uint8 conversion known for tokenizer {tok.model.name!r}; "
        f"set --config.tokenizer.uint8 to one of {pixels.UINT8_METHODS}.")
  if method not in pixels.UINT8_METHODS:
    raise pixels.Uint8MethodError(
        f"config.tokenizer.uint8={method!r} is unknown; use one of "
        f"{pixels.UINT8_METHODS}, or '' for the tokenizer's official default.")
  return method


def _check_uint8(images):
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError("images must be uint8 (N, H, W, 3); got "
                     f"{images.dtype} {images.shape}. Convert with "
                     "genvis_jax.core.pixels.to_uint8 first.")
  return images


def make_grid(images_uint8, ncols: int | None = None, pad: int = 2):
  """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8
  image. Raises ``ValueError`` for images that are not uint8 (N, H, W, 3)."""
  return metrics.make_grid(_check_uint8(images_uint8), ncols, pad)


def grid_columns(height: int, width: int, square: int = 10) -> int:
  """Columns of a sample grid: ``square`` for square images, fewer for wide
  ones so a row stays about as wide as ``square`` square images (one 8x-wide
  Equivariant sample per row, not ten in a strip)."""
  return max(1, min(square, round(square * height / width)))


def save_grid(images_uint8, path: str, ncols: int | None = None) -> str:
  """Writes a PNG grid of the uint8 (N, H, W, 3) images (local or ``gs://``);
  returns ``path``. Raises ``ValueError`` for other images."""
  metrics.save_png(path, make_grid(images_uint8, ncols))
  return path


def save_npz(path: str, images_uint8, labels=None) -> str:
  """Saves ``arr_0`` = images (N, H, W, 3) uint8 (the ADM evaluator's key) and,
  if given, ``labels`` (N,), as ``np.savez`` lays them out; returns
  ``path``. Raises ``ValueError`` for images that are not uint8 (N, H, W, 3)
  or labels not (N,)."""
  images = _check_uint8(images_uint8)
  return save_npz_parts(path, [images], images.shape, labels)


def save_npz_parts(path: str, parts: Iterable[np.ndarray],
                   shape: tuple[int, ...], labels=None) -> str:
  """``save_npz`` of the images ``parts`` (uint8 (n_i, H, W, 3)) would join
  into ``shape`` (N, H, W, 3), written part by part: one part in memory,
  not the whole set twice (50,000 images at 256 px are 9.8 GB). Local or
  ``gs://``, whole or not at all (``files.write_whole``).

  Raises ValueError if a part is not uint8 images of that size, the parts
  hold another number of images than ``shape[0]``, or ``labels`` is not
  (N,)."""
  shape = tuple(int(d) for d in shape)
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != shape[:1]:
      raise ValueError(f"labels must have shape ({shape[0]},), got "
                       f"{labels.shape}.")

  def write(tmp):
    # np.savez's layout: stored (uncompressed) zip64 members "<key>.npy".
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      with zf.open("arr_0.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False, "shape": shape})
        rows = 0
        for part in parts:
          part = _check_uint8(part)
          if part.shape[1:] != shape[1:]:
            raise ValueError(f"A part of {path} holds images of shape "
                             f"{part.shape[1:]}, the others {shape[1:]}.")
          f.write(np.ascontiguousarray(part).data)
          rows += len(part)
        if rows != shape[0]:
          raise ValueError(f"The parts of {path} hold {rows} images, not "
                           f"{shape[0]}.")
      if labels is not None:
        with zf.open("labels.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, labels)

  files.write_whole(path, write)
  return path
