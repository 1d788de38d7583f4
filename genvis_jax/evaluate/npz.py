"""``.npz`` arrays in ADM's layout (``arr_0`` uint8 (N, H, W, 3) images, as
sample and reference files hold them) read in batches straight from the zip
member, so 50,000 images never sit in memory at once."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator

import numpy as np

from genvis_jax.errors import UserError


class NpzFileError(UserError, FileNotFoundError):
  """An ``.npz`` of samples or reference statistics is missing or unreadable."""


class NpzContentError(UserError, ValueError):
  """An ``.npz`` holds other arrays than the ones asked for (e.g. not images
  in ADM's layout, not a reference batch)."""


def check_file(path: str, setting: str = "") -> None:
  """Raises ``NpzFileError`` unless ``path`` is an existing file, naming
  ``setting``; a folder gets the ``.npz`` inside it suggested (a sampling
  workdir holds ``samples.npz``)."""
  where = f" ({setting})" if setting else ""
  if os.path.isdir(path):
    inside = sorted(n for n in os.listdir(path) if n.endswith(".npz"))
    hint = (f"; did you mean {os.path.join(path, inside[0])!r}?" if inside
            else ", with no .npz file in it.")
    raise NpzFileError(f"{path!r}{where} is a folder, not an .npz file{hint}")
  if not os.path.exists(path):
    raise NpzFileError(f"No such .npz file: {path!r}{where}. Check the path.")



@dataclasses.dataclass
class NpzArray:
  """One array of an ``.npz`` file, readable in batches without loading it all."""
  path: str
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int, limit: int | None = None
              ) -> Iterator[np.ndarray]:
    """Yields consecutive (<= batch_size, ...) slices of the first ``limit`` rows."""
    n = len(self) if limit is None else min(limit, len(self))
    with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
      version = np.lib.format.read_magic(f)
      shape, fortran, dtype = _read_header(f, version)
      if fortran or dtype.hasobject:   # rare: fall back to a full load
        arr = np.load(self.path)[self.key]
        for i in range(0, n, batch_size):
          yield np.asarray(arr[i:min(i + batch_size, n)])
        return
      row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        data = f.read(b * row)
        if len(data) != b * row:
          raise ValueError(f"{self.path}: {self.key} is truncated at row {i}.")
        yield np.frombuffer(data, dtype).reshape(b, *shape[1:])


def _read_header(f, version):
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version in ((2, 0), (3, 0)):   # 3.0 differs only in the header encoding
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"Unsupported .npy format version {version}.")


def load_samples(path: str, setting: str = "config.evaluate.samples") -> dict:
  """Every array of the samples ``.npz`` at ``path`` (``arr_0``, ``labels``...),
  read at once; a clear error when ``setting`` is unset or the file is
  missing or not an ``.npz``."""
  if not path:
    raise NpzFileError(f"{setting} is not set: point it at the samples .npz "
                       "that --config.mode=sample writes (samples.npz).")
  check_file(path, setting)
  try:
    with np.load(path) as d:
      return {k: d[k] for k in d.files}
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise NpzFileError(f"{path!r} ({setting}) is not a readable .npz file "
                       f"({e}).") from e


def open_npz_array(path: str, key: str = "arr_0", setting: str = "") -> NpzArray:
  """Reads the header of ``key`` in the ``.npz`` at ``path`` (``setting``
  names it in messages)."""
  check_file(path, setting)
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise NpzFileError(f"{path!r} is not an .npz (zip) file: truncated, or "
                       "not written by numpy.savez.") from e
  with zf:
    names = zf.namelist()
    if f"{key}.npy" not in names:
      raise NpzContentError(f"{path!r} has no {key!r} array (has "
                       f"{sorted(n[:-4] for n in names)}). ADM-format files "
                       "keep the images in 'arr_0'.")
    with zf.open(f"{key}.npy") as f:
      shape, _, dtype = _read_header(f, np.lib.format.read_magic(f))
  return NpzArray(path, key, tuple(shape), dtype)


def open_images(path: str, key: str = "arr_0", setting: str = "") -> NpzArray:
  """Like ``open_npz_array`` but checks for uint8 (N, H, W, 3) images."""
  arr = open_npz_array(path, key, setting)
  if arr.dtype != np.uint8 or len(arr.shape) != 4 or arr.shape[-1] != 3:
    raise NpzContentError(f"{path}:{key} must be uint8 (N, H, W, 3) images in [0, "
                     f"255] (ADM layout), got {arr.dtype} {arr.shape}.")
  return arr
