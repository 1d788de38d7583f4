"""torch.save files read without torch: a restricted Unpickler.

Only the tensor/storage rebuild functions, ``collections.OrderedDict`` and
plain data (``argparse.Namespace``, numpy scalars/arrays) resolve. Any other
global (``os.system``, a model class, ...) raises ``UnsafeCheckpointError``
before anything is called, so a file cannot run code. Storages are read
lazily and tensors come back as numpy arrays in their stored dtype
(``bfloat16`` as ``ml_dtypes.bfloat16``); uncompressed zip members are
memory-mapped, so a multi-GB checkpoint is not held twice.

Two layouts: the zip archive of torch >= 1.6 (:func:`read_zip`) and the
legacy stream of torch < 1.6 (:func:`read_legacy`: torchvision's
``vgg16-*.pth``, LPIPS's ``weights/v0.1/vgg.pth``). Format detection and
error wrapping are ``genvis_jax.convert.io``'s.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from genvis_jax.errors import CheckpointFileError, UnsafeCheckpointError


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Format names for the messages.
ZIP, LEGACY = "torch.save zip", "legacy torch.save (pickle)"


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


class _Storage:
  """A flat typed buffer; ``array`` is set once its bytes are read."""

  def __init__(self, dtype, numel: int):
    self.dtype, self.numel, self.array = np.dtype(dtype), int(numel), None


@dataclasses.dataclass
class _LazyTensor:
  """A tensor view (element offset/size/stride) of a storage not yet read."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple

  def materialize(self) -> np.ndarray:
    buf = self.storage.array
    size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
    if 0 in size:
      return np.zeros(size, buf.dtype.newbyteorder("="))
    last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if self.offset < 0 or last >= buf.shape[0]:
      raise CheckpointFileError(
          f"Corrupt checkpoint: a tensor of shape {size} reaches "
          f"element {last} of a storage of {buf.shape[0]}.")
    numel = int(np.prod(size))
    if buf.dtype.isnative and _contiguous(size, stride):
      # A read-only view of the (memory-mapped) storage: no copy, so a
      # multi-GB checkpoint is not held twice.
      return np.asarray(buf[self.offset:self.offset + numel]).reshape(size)
    view = np.lib.stride_tricks.as_strided(
        buf[self.offset:], shape=size,
        strides=tuple(s * buf.itemsize for s in stride), writeable=False)
    return np.array(view, dtype=buf.dtype.newbyteorder("="))


def _contiguous(size, stride) -> bool:
  expected = 1
  for n, s in reversed(list(zip(size, stride))):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  root, view_offset = storage
  return _LazyTensor(root, view_offset + int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


def _numpy_scalar(dtype, data=None):
  if not isinstance(data, bytes):  # object dtype would store a Python object
    raise pickle.UnpicklingError("Only numeric numpy scalars are supported.")
  return np.frombuffer(data, dtype=dtype)[0]


def _numpy_reconstruct(cls, shape, dtype):
  if cls is not np.ndarray:
    raise pickle.UnpicklingError(f"Only plain numpy arrays are supported, not {cls}.")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): types.SimpleNamespace,
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
  _ALLOWED[(_mod, "scalar")] = _numpy_scalar
  _ALLOWED[(_mod, "_reconstruct")] = _numpy_reconstruct
for _name, _dt in _STORAGE_DTYPES.items():
  _ALLOWED[("torch", _name)] = _StorageType(_dt)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages come from ``load_storage``."""

  def __init__(self, file, source: str,
               load_storage: Callable[[tuple], tuple[_Storage, int]] | None):
    super().__init__(file, encoding="utf-8")
    self._source, self._load_storage = source, load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafeCheckpointError(
        f"{self._source}: the pickle references the global '{module}.{name}', "
        "which is neither a tensor/storage type nor plain data; refusing to "
        "unpickle it (that could run arbitrary code). Allowed: torch tensor and "
        "storage rebuilds, collections.OrderedDict, argparse.Namespace, numpy "
        "scalars/arrays. If you trust the file, load it with torch and save just "
        "the weights: torch.save(ckpt['model'], 'weights.pt') or safetensors.")

  def persistent_load(self, pid):
    if self._load_storage is None or not (isinstance(pid, tuple) and pid
                                          and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}.")
    return self._load_storage(pid)


def _storage_type(value, source) -> np.dtype:
  if not isinstance(value, _StorageType):
    raise pickle.UnpicklingError(f"{source}: storage of unsupported type {value!r}.")
  return value.dtype


def _zip_member_array(path: str, zf: zipfile.ZipFile, name: str, dtype) -> np.ndarray:
  """Memory-maps an uncompressed zip member (torch stores them uncompressed)."""
  info = zf.getinfo(name)
  dtype = np.dtype(dtype)
  if info.compress_type != zipfile.ZIP_STORED:
    return np.frombuffer(zf.read(name), dtype)
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    header = f.read(30)
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  start = info.header_offset + 30 + name_len + extra_len
  count = info.file_size // dtype.itemsize
  if count == 0:
    return np.zeros((0,), dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(count,))


def read_zip(path: str) -> Any:
  """A torch >= 1.6 ``torch.save`` zip archive (storages memory-mapped)."""
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise CheckpointFileError(
          f"{path} is a zip file but not a torch.save archive "
          "(no unique */data.pkl).")
    prefix = pkl[0][:-len("data.pkl")]
    big = (prefix + "byteorder" in zf.namelist()
           and zf.read(prefix + "byteorder").strip() == b"big")
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
      _, stype, key, _location, numel = pid[:5]
      dtype = np.dtype(_storage_type(stype, path))
      dtype = dtype.newbyteorder(">") if big else dtype
      if key not in storages:
        storages[key] = _Storage(dtype, numel)
        storages[key].array = _zip_member_array(path, zf, f"{prefix}data/{key}",
                                                dtype)
      return storages[key], 0

    with zf.open(pkl[0]) as f:
      obj = _RestrictedUnpickler(f, path, load_storage).load()
    return _materialize(obj)


def read_legacy(path: str) -> Any:
  """torch < 1.6 stream: magic, protocol, sys_info, object, keys, raw storages."""
  with open(path, "rb") as f:
    plain = lambda: _RestrictedUnpickler(f, path, None).load()
    magic = plain()    # a failure here is reported by read_file
    if magic != _LEGACY_MAGIC:
      raise CheckpointFileError(
          f"{path}: not a torch.save file (bad magic number); very old "
          "tar-format files are not supported, re-save with torch.")
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise CheckpointFileError(
          f"{path}: big-endian legacy torch files are not supported.")
    roots: dict[str, _Storage] = {}

    def load_storage(pid):
      _, stype, key, _location, numel, view = (tuple(pid) + (None,))[:6]
      if key not in roots:
        roots[key] = _Storage(_storage_type(stype, path), numel)
      if view is not None:
        return roots[view[0]] if view[0] in roots else roots[key], int(view[1])
      return roots[key], 0

    obj = _RestrictedUnpickler(f, path, load_storage).load()
    keys = plain()
    # Each storage follows as an int64 element count and its raw bytes.
    expected = f.tell() + sum(8 + roots[k].numel * roots[k].dtype.itemsize
                              for k in keys)
    size = os.fstat(f.fileno()).st_size
    if size < expected:
      raise CheckpointFileError.truncated(path, LEGACY, size, expected)
    for key in keys:
      st = roots[key]
      (numel,) = struct.unpack("<q", f.read(8))
      data = f.read(numel * st.dtype.itemsize)
      if len(data) != numel * st.dtype.itemsize:
        raise CheckpointFileError.truncated(path, LEGACY, size,
                                            detail=f" (storage {key} ends early)")
      st.array = np.frombuffer(data, st.dtype)
  return _materialize(obj)


def _materialize(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v) for v in obj)
  return obj
