"""Reads checkpoint files into ``{name: numpy array}`` without importing torch.

Formats (chosen by content, not by suffix):
  * torch.save zip archives (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``, torch >= 1.6);
  * the legacy torch.save stream (torch < 1.6: torchvision's ``vgg16-*.pth``,
    LPIPS's ``weights/v0.1/vgg.pth``);
  * ``.safetensors`` (header + raw little-endian buffers, parsed here so that
    BF16 works without torch) and ``.npz``.

Pickles are read by a restricted Unpickler: only the tensor/storage rebuild
functions, ``collections.OrderedDict`` and plain data (``argparse.Namespace``,
numpy scalars/arrays) resolve. Any other global (``os.system``, a model class,
...) raises :class:`UnsafeCheckpointError` before anything is called, so a file
cannot run code. Tensors come back as numpy arrays in their stored dtype
(``bfloat16`` as ``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from genvis_jax.errors import UserError


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
  """A pickle asked for a global outside the allow-list (it could run code)."""


class CheckpointFileError(UserError, ValueError):
  """A weight file is truncated, damaged or of an unknown format.

  The message names the path, the format seen and the size (``looks
  truncated: SEEN of EXPECTED bytes`` where the file states its full size).
  """


class CheckpointFileNotFoundError(UserError, FileNotFoundError):
  """The weight file named on the command line does not exist."""


class WeightKeyError(UserError, KeyError):
  """``--key`` names an entry the checkpoint does not have."""


def _truncated(path: str, fmt: str, seen: int, expected: int | None = None,
               at_least: bool = False, detail: str = "") -> CheckpointFileError:
  """The error for a file that ends early; ``expected`` None: size unknown."""
  if expected is None:
    size = f"{seen} bytes"
  else:
    size = f"{seen} of {'at least ' if at_least else ''}{expected} bytes"
  return CheckpointFileError(
      f"{path}: {fmt} file looks truncated: {size}{detail}. The download or "
      "copy was probably interrupted; fetch the file again (compare its size "
      "or checksum with the source).")


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Keys under which training scripts nest the weights, in the order tried.
WEIGHT_KEYS = ("model", "state_dict", "module", "model_ema", "ema", "net")


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


def _read_torch_zip(path: str) -> Any:
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


def _read_torch_legacy(path: str) -> Any:
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
      raise _truncated(path, _LEGACY, size, expected)
    for key in keys:
      st = roots[key]
      (numel,) = struct.unpack("<q", f.read(8))
      data = f.read(numel * st.dtype.itemsize)
      if len(data) != numel * st.dtype.itemsize:
        raise _truncated(path, _LEGACY, size,
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


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _truncated(path, _SAFETENSORS, size, 8, at_least=True)
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise _truncated(path, _SAFETENSORS, size, 8 + n, at_least=True,
                       detail=" (its JSON header alone ends later)")
    header = json.loads(f.read(n))
  # The header states every tensor's byte range: the file ends at the last.
  ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
  if 8 + n + max(ends, default=0) > size:
    raise _truncated(path, _SAFETENSORS, size, 8 + n + max(ends))
  raw = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointFileError(
          f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    start, end = (8 + n + o for o in info["data_offsets"])
    out[name] = np.array(raw[start:end].view(dtype).reshape(info["shape"]),
                         dtype=dtype.newbyteorder("="))
  return out


_ZIP, _NPZ, _LEGACY, _SAFETENSORS = (
    "torch.save zip", ".npz", "legacy torch.save (pickle)", ".safetensors")


def _zip_entries_end(path: str, size: int) -> tuple[str, int | None]:
  """Walks the local headers of a zip without a central directory.

  Returns ``(format, bytes the entries seen need or None)``: the format is
  ``.npz`` if the first member is a ``.npy``. torch.save writes sizes only in
  data descriptors (flag bit 3), so its length is unknown from the front.
  """
  fmt, pos, end = _ZIP, 0, None
  with open(path, "rb") as f:
    while pos + 30 <= size:
      f.seek(pos)
      head = f.read(30)
      if head[:4] != b"PK\x03\x04":
        break
      flags, = struct.unpack("<H", head[6:8])
      comp_size, = struct.unpack("<I", head[18:22])
      name_len, extra_len = struct.unpack("<HH", head[26:30])
      name = f.read(name_len)
      if pos == 0 and name.endswith(b".npy"):
        fmt = _NPZ
      if flags & 0x8:      # sizes follow the data: cannot skip ahead
        break
      if comp_size == 0xFFFFFFFF:     # zip64 (np.savez): sizes in the extra
        comp_size = _zip64_compressed_size(f.read(extra_len))
        if comp_size is None:
          break
      pos = end = pos + 30 + name_len + extra_len + comp_size
  return fmt, end


def _zip64_compressed_size(extra: bytes) -> int | None:
  """Compressed size from a local header's zip64 extra field (id 1: original
  then compressed size, 8 bytes each; APPNOTE 4.5.3)."""
  pos = 0
  while pos + 4 <= len(extra):
    tag, n = struct.unpack("<HH", extra[pos:pos + 4])
    if tag == 1 and n >= 16:
      return struct.unpack("<Q", extra[pos + 12:pos + 20])[0]
    pos += 4 + n
  return None


def _sniff(path: str, head: bytes) -> str | None:
  if path.endswith(".safetensors"):
    return _SAFETENSORS
  if head[:4] == b"PK\x03\x04":
    return _ZIP
  if head[:1] == b"\x80":
    return _LEGACY
  return None


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    if any(n.endswith(".npy") for n in zf.namelist()):
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
  return _read_torch_zip(path)


def read_file(path: str, setting: str = "--src") -> Any:
  """The whole object stored in ``path`` (nested dicts; tensors as numpy).

  Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` (a pickle that could
  run code) or ``CheckpointFileError`` naming the path, the format seen and
  the size for an unknown, truncated or damaged file. ``setting`` names where
  the path came from (for the messages).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFileNotFoundError(
        f"Weights file {path} not found; check the path ({setting}).")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
  fmt = _sniff(path, head)
  if fmt is None:
    raise CheckpointFileError(
        f"{path}: unknown checkpoint format ({size} bytes, starts with "
        f"{head!r}); expected a torch.save file (.bin/.pt/.pth/.ckpt), "
        ".safetensors or .npz.")
  if fmt == _ZIP and not zipfile.is_zipfile(path):
    # The central directory is written last: without it the end is missing.
    fmt, end = _zip_entries_end(path, size)
    fmt = fmt if fmt == _ZIP else f"{fmt} (zip)"
    if end is not None and end > size:
      raise _truncated(path, fmt, size, end, at_least=True)
    raise _truncated(path, fmt, size, detail=(
        "; its central directory, written last, is missing"))
  reader = {_ZIP: _read_zip, _LEGACY: _read_torch_legacy,
            _SAFETENSORS: _read_safetensors}[fmt]
  try:
    return reader(path)
  except (UserError, pickle.UnpicklingError) as e:
    if isinstance(e, UserError):
      raise
    error = e
  except (EOFError, OSError, ValueError, KeyError, struct.error,
          zipfile.BadZipFile, json.JSONDecodeError) as e:
    error = e
  what = f"{path}: damaged {fmt} file ({size} bytes): {type(error).__name__}: "
  if isinstance(error, EOFError) or "truncated" in str(error).lower():
    raise _truncated(path, fmt, size, detail=f" ({error or 'ends early'})"
                     ) from error
  raise CheckpointFileError(
      f"{what}{error}. Fetch the file again; if it is intact, re-save the "
      "weights with torch.save(model.state_dict(), ...) or safetensors."
  ) from error


def _is_state_dict(obj) -> bool:
  return (isinstance(obj, dict) and bool(obj)
          and all(isinstance(k, str) and isinstance(v, np.ndarray)
                  for k, v in obj.items()))


def _describe(obj: dict) -> str:
  return ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:20])


def select_state_dict(obj, key: str | None = None, source: str = "checkpoint"):
  """Picks the flat ``{name: array}`` weight dict out of a loaded checkpoint.

  ``key`` ("/"-separated for deeper nesting, e.g. ``"state/model"``) picks a
  nested dict explicitly; otherwise the object itself if it is flat, else the
  single one of ``WEIGHT_KEYS`` present (ambiguity is an error, since e.g. the
  EMA and raw weights differ). A common ``module.`` (DDP) prefix is dropped.
  """
  if key:
    for part in key.split("/"):
      if not isinstance(obj, dict) or part not in obj:
        have = _describe(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WeightKeyError(f"{source}: no entry {part!r} (from key={key!r}); it holds "
                       f"{have}.")
      obj = obj[part]
  elif not _is_state_dict(obj):
    if not isinstance(obj, dict):
      raise CheckpointFileError(
          f"{source} holds a {type(obj).__name__}, not a dict of tensors.")
    found = [k for k in WEIGHT_KEYS if _is_state_dict(obj.get(k))]
    if len(found) != 1:
      why = "several weight dicts" if found else "no flat dict of tensors"
      raise CheckpointFileError(
          f"{source} holds {why} ({_describe(obj)}); choose one with "
          "--key=NAME (e.g. --key=model or --key=ema).")
    obj = obj[found[0]]
  if not _is_state_dict(obj):
    raise CheckpointFileError(
        f"{source}: the selected entry is not a flat dict of tensors "
        f"({_describe(obj) if isinstance(obj, dict) else type(obj).__name__}).")
  if all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


def load_state_dict(path: str, key: str | None = None,
                    setting: str = "--src") -> dict[str, np.ndarray]:
  """``{official name: numpy array}`` from a torch / safetensors / npz file;
  the errors of :func:`read_file` (``setting``: where the path came from)."""
  return select_state_dict(read_file(path, setting), key, os.fspath(path))
