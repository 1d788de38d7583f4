"""Reads checkpoint files into ``{name: numpy array}`` without importing torch.

Formats (chosen by content, not by suffix):
  * torch.save zip archives (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``, torch >= 1.6);
  * the legacy torch.save stream (torch < 1.6: torchvision's ``vgg16-*.pth``,
    LPIPS's ``weights/v0.1/vgg.pth``);
  * ``.safetensors`` (header + raw little-endian buffers, parsed here so that
    BF16 works without torch) and ``.npz``.

Pickles go through the restricted Unpickler of
``genvis_jax.convert.torch_pickle``: a file cannot run code
(``genvis_jax.errors.UnsafeCheckpointError``). A truncated or damaged file raises
``CheckpointFileError`` naming the path, the format seen and its size.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from genvis_jax.convert import torch_pickle
from genvis_jax.errors import (CheckpointFileError, CheckpointFileNotFoundError,
                               UserError, WeightKeyError)


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
      raise CheckpointFileError.truncated(path, _SAFETENSORS, size, 8,
                                          at_least=True)
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise CheckpointFileError.truncated(
          path, _SAFETENSORS, size, 8 + n, at_least=True,
          detail=" (its JSON header alone ends later)")
    header = json.loads(f.read(n))
  # The header states every tensor's byte range: the file ends at the last.
  ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
  if 8 + n + max(ends, default=0) > size:
    raise CheckpointFileError.truncated(path, _SAFETENSORS, size,
                                        8 + n + max(ends))
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


_ZIP, _LEGACY = torch_pickle.ZIP, torch_pickle.LEGACY
_NPZ, _SAFETENSORS = ".npz", ".safetensors"
# Keys under which training scripts nest the weights, in the order tried.
WEIGHT_KEYS = ("model", "state_dict", "module", "model_ema", "ema", "net")


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


def _sniff(path: str, head: bytes, size: int) -> str | None:
  # safetensors: a little-endian u64 header length, then the JSON header.
  if path.endswith(".safetensors") or (
      len(head) > 8 and head[8:9] == b"{"
      and 0 < struct.unpack("<Q", head[:8])[0] < size):
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
  return torch_pickle.read_zip(path)


def read_file(path: str, setting: str = "--src") -> Any:
  """The whole object stored in ``path`` (nested dicts; tensors as numpy).

  Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` (a pickle that could
  run code) or ``CheckpointFileError`` naming the path, the format seen and
  the size for an unknown, truncated or damaged file. ``setting`` names where
  the path came from (for the messages).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    converted = os.path.isdir(os.path.join(path, "params"))
    raise CheckpointFileError(
        f"{path} ({setting}) is a folder; {setting} takes the weight file "
        "itself (e.g. FOLDER/model.safetensors or FOLDER/pytorch_model.bin)" +
        ("; this folder holds converted weights already: point init_from "
         "(or the tokenizer / teacher setting) at it instead." if converted
         else "."))
  if not os.path.isfile(path):
    raise CheckpointFileNotFoundError(
        f"Weights file {path} not found; check the path ({setting}).")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(24)
  if head.startswith(b"version https://git-lfs"):
    raise CheckpointFileError(
        f"{path} ({setting}) is a Git LFS pointer ({size} bytes), not the "
        "weights: fetch the file itself (`git lfs pull` in its clone, or "
        "`hf download`).")
  fmt = _sniff(path, head, size)
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
      raise CheckpointFileError.truncated(path, fmt, size, end, at_least=True)
    raise CheckpointFileError.truncated(path, fmt, size, detail=(
        "; its central directory, written last, is missing"))
  reader = {_ZIP: _read_zip, _LEGACY: torch_pickle.read_legacy,
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
    raise CheckpointFileError.truncated(
        path, fmt, size, detail=f" ({error or 'ends early'})") from error
  raise CheckpointFileError(
      f"{what}{error}. Fetch the file again; if it is intact, re-save the "
      "weights with torch.save(model.state_dict(), ...) or safetensors."
  ) from error


def _is_state_dict(obj) -> bool:
  return (isinstance(obj, dict) and bool(obj)
          and all(isinstance(k, str) and isinstance(v, np.ndarray)
                  for k, v in obj.items()))


def _describe(obj: dict, limit: int = 8) -> str:
  """The first ``limit`` entries of ``obj`` with their types, and how many
  more (a flat state dict holds hundreds)."""
  shown = ", ".join(f"{k!r} ({type(v).__name__})"
                    for k, v in list(obj.items())[:limit])
  return shown + (f", ... {len(obj) - limit} more" if len(obj) > limit else "")


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
    # An EMA copy under another name (timm's state_dict_ema): never passed
    # over for the raw weights beside it without a word.
    found += [k for k in obj if isinstance(k, str) and "ema" in k.lower()
              and k not in found and _is_state_dict(obj[k])]
    if len(found) != 1:
      why = (f"several weight dicts ({', '.join(map(repr, found))})" if found
             else "no flat dict of tensors")
      raise CheckpointFileError(
          f"{source} holds {why} ({_describe(obj)}); choose one with "
          "--key=NAME (e.g. --key=model or --key=ema).")
    logging.info("%s: reading the weights in its entry %r (--key=NAME "
                 "chooses another).", source, found[0])
    obj = obj[found[0]]
  if not _is_state_dict(obj):
    raise CheckpointFileError(
        f"{source}: the selected entry is not a flat dict of tensors "
        f"({_describe(obj) if isinstance(obj, dict) else type(obj).__name__}).")
  return _unwrapped(dict(obj))


# Prefixes a training wrapper gives every key: DDP / AveragedModel
# (``module.``), torch.compile (``_orig_mod.``).
WRAPPERS = ("module.", "_orig_mod.")


def _unwrapped(state: dict) -> dict:
  """``state`` without the ``WRAPPERS`` prefixes every key shares (in any
  nesting), and AveragedModel's ``n_averaged`` count beside them."""
  if "n_averaged" in state and len(state) > 1 and all(
      k.startswith("module.") for k in state if k != "n_averaged"):
    state = {k: v for k, v in state.items() if k != "n_averaged"}
  while state and (prefix := next((w for w in WRAPPERS if all(
      k.startswith(w) for k in state)), None)):
    state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def load_state_dict(path: str, key: str | None = None,
                    setting: str = "--src") -> dict[str, np.ndarray]:
  """``{official name: numpy array}`` from a torch / safetensors / npz file;
  the errors of :func:`read_file` (``setting``: where the path came from)."""
  return select_state_dict(read_file(path, setting), key, os.fspath(path))
