"""``.npz`` arrays in ADM's layout (``arr_0`` uint8 (N, H, W, 3) images, as
sample and reference files hold them) read in batches straight from the zip
member, so 50,000 images never sit in memory at once."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from typing import Iterator

import numpy as np
from etils import epath

from genvis_jax.core import files
from genvis_jax.errors import UserError


class NpzFileError(UserError, FileNotFoundError):
  """An ``.npz`` of samples or reference statistics is missing or unreadable."""


class NpzContentError(UserError, ValueError):
  """An ``.npz`` holds other arrays than the ones asked for (e.g. not images
  in ADM's layout, not a reference batch)."""


def check_file(path: str, setting: str = "") -> None:
  """Raises ``NpzFileError`` unless ``path`` (local or ``gs://``) is an
  existing file, naming ``setting``; a folder gets the ``.npz`` inside it
  suggested (a sampling workdir holds ``samples.npz``)."""
  where = f" ({setting})" if setting else ""
  found = epath.Path(path)
  if found.is_dir():
    inside = sorted(p.name for p in found.iterdir() if p.name.endswith(".npz"))
    hint = (f"; did you mean {os.path.join(path, inside[0])!r}?" if inside
            else ", with no .npz file in it.")
    raise NpzFileError(f"{path!r}{where} is a folder, not an .npz file{hint}")
  if not found.exists():
    raise NpzFileError(f"No such .npz file: {path!r}{where}. Check the path.")


def _unreadable(path: str, setting: str, error: Exception) -> NpzFileError:
  where = f" ({setting})" if setting else ""
  again = ("write one with --config.evaluate.kind=reference"
           if _is_reference(setting) else "write it again "
           "(`--config.mode=sample` re-assembles samples.npz from its parts)")
  return NpzFileError(
      f"{path!r}{where} is not a readable .npz file ({type(error).__name__}: "
      f"{str(error)[:200]}): it is cut short (a copy or write that did not "
      f"finish) or was not written by numpy.savez. Copy it again, or {again}.")


# Leading bytes of files given by mistake, named in the message.
_KNOWN_FILES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                (b"\x80", "a pickle (torch.save / pickle.dump)"),
                (b"{", "JSON text"))


def _check_head(f, path: str, setting: str) -> None:
  """Reads the first bytes of the open file ``f`` (then rewinds): a single
  ``.npy`` array, or a file that is no zip archive at all (an ``.npz`` is
  one), raise ``NpzFileError`` naming what it looks like."""
  head = f.read(8)
  f.seek(0)
  if head.startswith(np.lib.format.MAGIC_PREFIX):
    raise _single_array(path, setting)
  if head[:2] == b"PK" or not head:   # a zip (maybe cut short), or empty
    return
  what = next((name for magic, name in _KNOWN_FILES
               if head.startswith(magic)), "no zip archive")
  where = f" ({setting})" if setting else ""
  which = ("an ADM reference batch, or what --config.evaluate.kind=reference "
           "writes" if _is_reference(setting) else
           "samples: what --config.mode=sample writes, samples.npz")
  raise NpzFileError(
      f"{path!r}{where} is not an .npz file: it is {what}. Pass the .npz "
      f"(numpy.savez; {which}).")


def _is_reference(setting: str) -> bool:
  """Whether ``setting`` names a reference batch (its fixes differ)."""
  return "reference" in setting


def _single_array(path: str, setting: str) -> NpzFileError:
  where = f" ({setting})" if setting else ""
  return NpzFileError(
      f"{path!r}{where} holds a single array (.npy), not an .npz of named "
      "arrays: save it with numpy.savez (images as arr_0).")


@contextlib.contextmanager
def _zip(path: str, setting: str = "") -> Iterator[zipfile.ZipFile]:
  """The ``.npz`` at ``path`` (local or ``gs://``) as an open zip file;
  ``NpzFileError`` naming ``setting`` and the fix when it is missing, a
  folder, a single ``.npy`` array, cut short or not a zip."""
  check_file(path, setting)
  with files.open_read(path) as f:
    _check_head(f, path, setting)
    try:
      zf = zipfile.ZipFile(f)
    except files.NPZ_READ_ERRORS as e:
      raise _unreadable(path, setting, e) from e
    with zf:
      yield zf


@contextlib.contextmanager
def open_npz(path: str, setting: str = "") -> Iterator[np.lib.npyio.NpzFile]:
  """``np.load`` of the ``.npz`` at ``path`` (local or ``gs://``): its
  arrays, each read when indexed. Errors as ``_zip``'s."""
  check_file(path, setting)
  with files.open_read(path) as f:
    _check_head(f, path, setting)
    try:
      data = np.load(f, allow_pickle=False)
    except files.NPZ_READ_ERRORS as e:
      raise _unreadable(path, setting, e) from e
    with data:   # an NpzFile: _check_head refused a single .npy array
      yield data


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
    """Yields consecutive (<= batch_size, ...) slices of the first ``limit``
    rows (None: all), in the array's dtype. Raises ``NpzContentError`` for
    an object array, ``NpzFileError`` for a file cut short."""
    n = len(self) if limit is None else min(limit, len(self))
    with _zip(self.path) as zf, zf.open(f"{self.key}.npy") as f:
      version = np.lib.format.read_magic(f)
      shape, fortran, dtype = _read_header(f, version)
      if dtype.hasobject:
        raise NpzContentError(f"{self.path!r}: {self.key} holds Python "
                              "objects, not arrays of numbers.")
      if fortran:   # rare (rows are not contiguous): read it whole
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        arr = np.frombuffer(f.read(size), dtype).reshape(shape, order="F")
        for i in range(0, n, batch_size):
          yield np.ascontiguousarray(arr[i:min(i + batch_size, n)])
        return
      row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        data = f.read(b * row)
        if len(data) != b * row:
          raise NpzFileError(
              f"{self.path!r}: {self.key} is cut short at row {i} of {n} (a "
              "copy or write that did not finish). Copy or write it again.")
        yield np.frombuffer(data, dtype).reshape(b, *shape[1:])


def _read_header(f, version):
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version in ((2, 0), (3, 0)):   # 3.0 differs only in the header encoding
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"Unsupported .npy format version {version}.")


def samples_howto(setting: str = "config.evaluate.samples") -> str:
  """The fix for an unset ``setting`` naming a samples file."""
  return (f"set --{setting}=RUN/samples.npz, the file --config.mode=sample "
          "--workdir=RUN writes")


def load_samples(path: str, setting: str = "config.evaluate.samples") -> dict:
  """Every array of the samples ``.npz`` at ``path`` (``arr_0``, ``labels``...),
  read at once; ``NpzFileError`` when ``setting`` is unset or the file is
  missing, unreadable or not an ``.npz``."""
  if not path:
    raise NpzFileError(f"{setting} is not set: {samples_howto(setting)}.")
  with open_npz(path, setting) as d:
    try:
      return {k: d[k] for k in d.files}
    except files.NPZ_READ_ERRORS as e:
      raise _unreadable(path, setting, e) from e


def open_npz_array(path: str, key: str = "arr_0", setting: str = "") -> NpzArray:
  """Reads the header of ``key`` in the ``.npz`` at ``path`` (``setting``
  names it in messages). Raises ``NpzFileError`` for a missing or unreadable
  file, ``NpzContentError`` when it has no ``key`` array, ``ValueError``
  for an unsupported ``.npy`` format version."""
  with _zip(path, setting) as zf:
    names = zf.namelist()
    if f"{key}.npy" not in names:
      raise NpzContentError(f"{path!r} has no {key!r} array (has "
                       f"{sorted(n[:-4] for n in names)}). ADM-format files "
                       "keep the images in 'arr_0'.")
    with zf.open(f"{key}.npy") as f:
      shape, _, dtype = _read_header(f, np.lib.format.read_magic(f))
  return NpzArray(path, key, tuple(shape), dtype)


def open_images(path: str, key: str = "arr_0", setting: str = "") -> NpzArray:
  """Like ``open_npz_array`` but checks for uint8 (N, H, W, 3) images
  (``NpzContentError`` otherwise)."""
  arr = open_npz_array(path, key, setting)
  if arr.dtype != np.uint8 or len(arr.shape) != 4 or arr.shape[-1] != 3:
    raise NpzContentError(f"{path}:{key} must be uint8 (N, H, W, 3) images in [0, "
                     f"255] (ADM layout), got {arr.dtype} {arr.shape}.")
  return arr
