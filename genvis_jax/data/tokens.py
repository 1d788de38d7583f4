"""Pre-tokenized data: (class, token array) records in ArrayRecord files.

Record format (little-endian, no protobuf), one record per example::

    b"GVT1" | int32 label | int32 dtype (0 = int32, 1 = uint16) | int32 ndim
            | int32 shape[ndim] | tokens (row-major, dtype above)

Tokens of any shape are allowed: (256,) for a 1D/2D tokenizer's raster codes,
(k, 256) for k factorized sub-codes. The writer stores uint16 when every code
is < 65536 (all tokenizers here), halving the size; the reader always returns
int32. Files are ``<prefix>-<i:05d>-of-<n:05d>.array_record``; ArrayRecord is
written with ``group_size:1`` so random access reads one record.
"""

from __future__ import annotations

import fnmatch
import glob as glob_lib
import json
import os
import re
from typing import Iterable, Sequence

from array_record.python import array_record_module
from etils import epath
import grain
import numpy as np

from genvis_jax.core import files
from genvis_jax.core.files import file_sha256  # the token files' hash
from genvis_jax.data.sources import DataNotFoundError
from genvis_jax import errors
from genvis_jax.errors import UserError

MAGIC = b"GVT1"
_DTYPES = (np.dtype("<i4"), np.dtype("<u2"))
WRITER_OPTIONS = "group_size:1"


class TokenFileError(UserError, ValueError):
  """A token file is truncated, damaged or not a genvis token file; the
  message names the file (and the record) and how to write it again."""


def rewrite_hint(path: str | None = None) -> str:
  """How to mend a damaged token file (``path`` named at the end, if given)."""
  return ("If it is damaged, write it again: re-run --config.mode=pretokenize "
          "with --config.pretokenize.overwrite=True (or restore it from a "
          "copy); if the storage failed, retry." +
          (f" File: {path}." if path else ""))


def encode_record(label: int, tokens: np.ndarray) -> bytes:
  """(label, integer tokens of any shape) -> bytes in the format above."""
  tokens = np.asarray(tokens)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise TypeError(f"Tokens must be integers, got {tokens.dtype}.")
  small = tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16)
  code = 1 if small else 0
  header = np.array([label, code, tokens.ndim, *tokens.shape], "<i4")
  return MAGIC + header.tobytes() + tokens.astype(_DTYPES[code]).tobytes()


def decode_record(data: bytes) -> dict:
  """bytes -> ``{"tokens": int32 array, "label": int32}``."""
  if data[:4] != MAGIC:
    raise ValueError(f"Not a genvis token record (magic {data[:4]!r}); was the "
                     "file written by genvis_jax.data.tokens?")
  label, code, ndim = np.frombuffer(data, "<i4", 3, 4)
  shape = tuple(np.frombuffer(data, "<i4", ndim, 16))
  tokens = np.frombuffer(data, _DTYPES[code], offset=16 + 4 * ndim)
  return {"tokens": tokens.reshape(shape).astype(np.int32),
          "label": np.int32(label)}


def shard_path(path_prefix: str, index: int, count: int) -> str:
  return f"{path_prefix}-{index:05d}-of-{count:05d}.array_record"


def read_records(paths) -> dict[str, dict | None]:
  """``{path: the JSON record beside it}`` (``<path>.json``, the settings
  pre-tokenizing wrote); None where there is no record or it is damaged."""
  out = {}
  for path in paths:
    try:
      record = json.loads(epath.Path(path + ".json").read_text())
    except (OSError, ValueError):   # no record, a damaged one
      record = None
    out[path] = record if isinstance(record, dict) else None
  return out


class TokenWriter:
  """Streams records into one ArrayRecord file (for the pre-tokenize loop).

  Writes ``path + ".partial"`` and renames it to ``path`` when the ``with``
  block ends without an exception, so an interrupted run leaves no file a
  training glob would read as a complete (but short) data set; on an
  exception the partial file is removed. ``sha256``: the finished file's
  hash (hashed before the rename, so the file and its record appear
  together), None until then. ``before_replace`` runs between the hash and
  the rename (pre-tokenizing removes the replaced file's record there: the
  old file keeps it until the new one is whole and hashed).

  Raises ``errors.OutputWriteError`` naming the file where a write, the
  hash or the rename fails (a full disk: ArrayRecord raises RuntimeError),
  after removing the partial file.
  """

  def __init__(self, path: str, before_replace=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._partial = path + ".partial"
    try:
      self._writer = array_record_module.ArrayRecordWriter(self._partial,
                                                           WRITER_OPTIONS)
    except (OSError, RuntimeError) as e:
      raise self._write_failed(e) from e
    self.count = 0
    self.sha256 = None
    self._before_replace = before_replace

  def write(self, label: int, tokens: np.ndarray):
    try:
      self._writer.write(encode_record(int(label), tokens))
    except (OSError, RuntimeError) as e:
      raise self._write_failed(e) from e
    self.count += 1

  def write_batch(self, labels: Sequence[int], tokens: Iterable[np.ndarray]):
    """``labels`` (B,), ``tokens`` (B, ...) -> B records."""
    for label, t in zip(labels, tokens):
      self.write(label, t)

  def close(self, complete: bool = True):
    """Finishes the file; renames it to ``path`` (``complete``) or deletes it."""
    partial = epath.Path(self._partial)
    try:
      try:
        self._writer.close()   # flushes the last chunk: a full disk shows here
      except (OSError, RuntimeError) as e:
        if complete:
          raise self._write_failed(e) from e
        # Dropped anyway: the error that stopped the block is the one to see.
      if complete:
        self.sha256 = file_sha256(self._partial)
        if self._before_replace is not None:
          self._before_replace()
        partial.replace(self.path)
    except OSError as e:
      if isinstance(e, errors.OutputWriteError):
        raise
      raise self._write_failed(e) from e
    finally:   # not renamed (or not asked to be): nothing partial is left
      partial.unlink(missing_ok=True)

  def _write_failed(self, e: BaseException) -> errors.OutputWriteError:
    return errors.OutputWriteError(
        f"Writing the token file {self.path} failed ({errors.first_line(e)}); "
        "its partial file is removed and finished files are kept. Free space "
        "(or fix the folder) and run the same command.")

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(complete=exc_type is None)


def write_token_records(path_prefix: str, labels, tokens,
                        num_shards: int = 1) -> list[str]:
  """Writes ``labels`` int (N,) and ``tokens`` int (N, ...) to ``num_shards``
  files (contiguous chunks). Returns the file paths."""
  labels = np.asarray(labels)
  if len(labels) != len(tokens):
    raise ValueError(f"{len(labels)} labels but {len(tokens)} token arrays.")
  bounds = np.linspace(0, len(labels), num_shards + 1).astype(int)
  paths = []
  for i in range(num_shards):
    path = shard_path(path_prefix, i, num_shards)
    with TokenWriter(path) as w:
      lo, hi = bounds[i], bounds[i + 1]
      w.write_batch(labels[lo:hi], tokens[lo:hi])
    paths.append(path)
  return paths


def glob_files(pattern: str) -> list[str]:
  """Sorted paths matching ``pattern`` (local or ``gs://``), leaving out the
  ``.json`` records and ``.partial`` files beside token files; none -> []."""
  if files.is_remote(pattern):  # e.g. gs://bucket/tokens/train-*.array_record
    parent, name = pattern.rsplit("/", 1)
    found = [str(p) for p in epath.Path(parent).glob(name)]
  else:
    found = glob_lib.glob(pattern)
  return sorted(p for p in found if not p.endswith((".json", ".partial")))


def token_files_exist(pattern: str) -> bool:
  """Whether ``pattern`` (a glob) matches any token file."""
  return bool(pattern) and bool(glob_files(pattern))


def find_token_files(pattern: str) -> list[str]:
  """Sorted files matching ``pattern``; a clear error when there are none."""
  if not pattern:
    raise DataNotFoundError(
        "config.data.path is empty: point it at the token files that "
        "--config.mode=pretokenize writes ('<workdir>/tokens/train-*.array_record').")
  if not token_files_exist(pattern):
    raise DataNotFoundError(
        f"No pre-tokenized files match {pattern!r} (config.data.path). Write "
        "them first with the pre-tokenize mode of this generator's config: "
        "`python -m genvis_jax.main --config=<this RAR / FAR config> "
        "--config.mode=pretokenize --config.tokenizer.checkpoint=<tokenizer "
        "weights> --workdir=<dir>`, then point config.data.path at the written "
        "'<prefix>-*.array_record' files.")
  found = glob_files(pattern)
  folders = [f for f in found
             if not f.endswith(".array_record") and epath.Path(f).is_dir()]
  if folders:
    raise DataNotFoundError(
        f"config.data.path={pattern!r} matches the folder {folders[0]}, not "
        f"token files: point it at the files, e.g. {_files_in(folders[0])!r}.")
  return found


_SHARD = re.compile(r"(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})"
                    r"\.array_record")


def shard_sets(paths: Iterable[str]) -> dict[str, dict[int, set[int]]]:
  """``{prefix: {count: {index, ...}}}`` of the ``<prefix>-<i>-of-<n>`` token
  files among ``paths`` (other names are left out)."""
  sets: dict[str, dict[int, set[int]]] = {}
  for path in paths:
    m = _SHARD.fullmatch(path)
    if m:
      sets.setdefault(m["prefix"], {}).setdefault(
          int(m["count"]), set()).add(int(m["index"]))
  return sets


def _count_to_keep(counts: dict[int, set[int]]) -> int:
  """Of one prefix's sets (``shard_sets``), the count of the newest-looking
  to suggest: the largest complete one, else the largest."""
  complete = [n for n, v in sorted(counts.items()) if len(v) == n]
  return (complete or sorted(counts))[-1]


def check_shard_sets(pattern: str, paths: Sequence[str]) -> None:
  """Refuses a glob that reads one pre-tokenize output incompletely or twice
  (training runs it on process 0: ``token_origin.check_training_files``).

  Pre-tokenizing on n processes writes ``<prefix>-<i>-of-<n>`` for i < n.
  Of every set the glob matches, each file the glob would match must exist
  (a glob narrowed on purpose, e.g. ``train-0000[0-3]-of-00008*``, asks for
  its files only), and one prefix must not come in sets of two counts (the
  same split written again on another number of processes: every example
  would be read twice). Names of another form are not checked.

  Raises:
    DataNotFoundError: a file of a set is missing (its process failed, or a
      copy did not finish).
    TokenFileError: a prefix comes in sets of two counts.
  """
  sets = shard_sets(paths)
  # A missing file sits beside the files found: match names only (glob and
  # epath return paths spelt otherwise than the pattern, e.g. "a//b").
  name_pattern = pattern.rsplit("/", 1)[-1]
  for prefix, counts in sorted(sets.items()):
    if len(counts) > 1:
      found = ", ".join(f"{len(v)} of {n} files -of-{n:05d}"
                        for n, v in sorted(counts.items()))
      keep = _count_to_keep(counts)
      raise TokenFileError(
          f"config.data.path={pattern!r} matches {len(counts)} pre-tokenize "
          f"outputs of {prefix} ({found}): the same split written by "
          "different numbers of processes, so examples would be read more "
          "than once. Narrow the glob to one set, e.g. "
          f"'{prefix}-*-of-{keep:05d}.array_record', or delete the others.")
    (count, indices), = counts.items()
    missing = [os.path.basename(shard_path(prefix, i, count))
               for i in range(count) if i not in indices]
    missing = [m for m in missing if fnmatch.fnmatchcase(m, name_pattern)]
    if missing:
      raise DataNotFoundError(
          f"config.data.path={pattern!r} matches {len(indices)} of the "
          f"{count} token files of {prefix}; missing "
          f"{len(missing)}: {', '.join(missing[:3])}"
          f"{' ...' if len(missing) > 3 else ''}. Each pre-tokenize process "
          "writes one file: its process failed or the copy did not finish. "
          f"Run the same pre-tokenize command again on {count} processes "
          "(complete files are reused) or copy the missing files.")


def _files_in(folder: str) -> str:
  """A glob of the token files in ``folder`` or its ``tokens/`` (where
  pretokenize writes), e.g. ``<folder>/tokens/train-*.array_record``."""
  for sub in (folder.rstrip("/"), folder.rstrip("/") + "/tokens"):
    names = [os.path.basename(n) for n in glob_files(sub + "/*.array_record")]
    if names:
      sets = shard_sets(names)
      if not sets:
        return f"{sub}/*.array_record"
      prefix = min(sets)
      if len(sets[prefix]) > 1:   # a glob over both sets would be refused
        return f"{sub}/{prefix}-*-of-{_count_to_keep(sets[prefix]):05d}.array_record"
      return f"{sub}/{prefix}-*.array_record"
  return f"{folder.rstrip('/')}/tokens/train-*.array_record"


class TokenSource:
  """Grain ``RandomAccessDataSource`` over token record files.

  ``source[i]`` -> ``{"tokens": int32 (...), "label": int32}``.
  """

  def __init__(self, pattern: str):
    self.pattern = pattern
    self.paths = find_token_files(pattern)
    self._starts = None   # first record of each file, see _locate
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except RuntimeError:
      # array_record's error names no file (often it has no message at all):
      # open each file on its own to name the bad one.
      for path in self.paths:
        count_records(path)
      raise
    if len(self._source) == 0:
      raise DataNotFoundError(f"Token files {pattern!r} contain no records; "
                              "re-run the pre-tokenize mode.")

  @property
  def token_shape(self) -> tuple[int, ...]:
    return self[0]["tokens"].shape

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    try:
      return decode_record(self._source[int(index)])
    except (RuntimeError, ValueError) as e:
      f, record = self._locate(int(index))
      raise TokenFileError(
          f"Token file {self.paths[f]}: record {record} cannot be read (a "
          f"damaged file or a storage error; {type(e).__name__}: "
          f"{str(e).strip()[:200]}). " + rewrite_hint(self.paths[f])) from e

  def _locate(self, index: int) -> tuple[int, int]:
    """(file, record in it) of a global index; opens every file the first
    time (only on an error path, never in a healthy run)."""
    if self._starts is None:
      self._starts = np.cumsum([0] + [count_records(p) for p in self.paths])
    f = int(np.searchsorted(self._starts, index, side="right")) - 1
    return f, index - int(self._starts[f])

  def __repr__(self):
    return f"TokenSource({self.pattern!r}, files={len(self.paths)}, n={len(self)})"


def count_records(path: str) -> int:
  """Records in one ArrayRecord file; ``TokenFileError`` naming the file
  when it cannot be opened (truncated, empty, not ArrayRecord)."""
  try:
    # The reader reports a bad file on its first use or on close, not when
    # constructed (array_record raises bare RuntimeErrors).
    reader = array_record_module.ArrayRecordReader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()
  except RuntimeError as e:
    size = epath.Path(path).stat().length
    why = str(e).strip() or "its footer cannot be read"
    raise TokenFileError(
        f"Token file {path} ({size} bytes) cannot be opened: {why}; it looks "
        "truncated or is not an ArrayRecord file. " + rewrite_hint(path)) from e
