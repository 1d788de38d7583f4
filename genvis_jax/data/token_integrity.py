"""Token files every process can trust: the same listing on every process
and the bytes each file's record has the SHA-256 of (run before training by
``token_origin.check_training_files``)."""

from __future__ import annotations

import concurrent.futures
import time
import zlib

import jax
import numpy as np
from absl import logging
from etils import epath

from genvis_jax.core import multihost
from genvis_jax.core import settings as settings_lib
from genvis_jax.data.tokens import (TokenFileError, file_sha256, glob_files,
                                    read_records, rewrite_hint)


def check_same_listing(pattern: str, files: list[str] | None = None) -> None:
  """Raises ``OtherProcessError`` on every process unless every process
  lists the same token files for ``pattern``. Each process reads its rows
  by index into its own sorted listing (and hashes every N-th file of it),
  so a host that sees a file more or less (a partial copy to local disk, a
  file still being written) would read other rows than the rest, or leave
  a file unchecked, without a word. Each differing process names up to five
  files process 0 does not list and counts those it lacks. ``files``: this
  process's listing of ``pattern`` when the caller has it (else listed
  here). One process: nothing to compare (no listing)."""
  if jax.process_count() == 1:
    return
  # Paths relative to the pattern's fixed folder, as 31-bit hashes: any
  # number of files fits one broadcast.
  wild = min((i for i, c in enumerate(pattern) if c in "*?["),
             default=len(pattern))
  root = pattern[:pattern.rfind("/", 0, wild) + 1]
  if files is None:
    files = glob_files(pattern)
  names = [p[len(root):] if p.startswith(root) else p for p in files]
  mine = [zlib.crc32(n.encode()) & 0x7FFFFFFF for n in names]
  theirs = set(multihost.broadcast_ints(mine))
  extra = [n for n, h in zip(names, mine) if h not in theirs]
  lacking = len(theirs - set(mine))
  differ = np.flatnonzero(
      multihost.gather_ints(int(bool(extra or lacking)))).tolist()
  if not differ:
    return
  here = []
  if extra:
    here.append(f"{len(extra)} file(s) process 0 does not list: "
                f"{settings_lib.shorten(extra, 5)}")
  if lacking:
    here.append(f"{lacking} of process 0's file(s) missing")
  detail = f" (this process: {'; '.join(here)})" if here else ""
  raise multihost.OtherProcessError(
      f"Processes {differ} list other token files for {pattern} than process "
      f"0{detail}. Every process reads its rows by index into its own "
      "listing: give every host the same files (the same bucket path, or a "
      "complete copy on each), then run again.")


# Files this process has hashed already (a run builds its iterator up to
# three times) -> the digest their record holds.
_VERIFIED: dict[str, str] = {}


def verify_checksums(pattern: str, files: list[str] | None = None) -> None:
  """Hashes this process's share of the token files matching ``pattern``
  (every ``process_count``-th of its sorted listing, ``files`` when the
  caller has it, so a pod reads the data once; several files at a time) and
  compares each with the SHA-256 in its record. Only the share's records are read. Files whose record has no
  ``sha256`` (written before records held one, or without a record) are not
  checked. A file is hashed once per process.

  Raises:
    TokenFileError: naming every file of the share that differs or cannot
      be read, and how to write it again. A damaged record would otherwise
      be found only by the step that reads it, after the steps since the
      last checkpoint.
  """
  files = glob_files(pattern) if files is None else files
  share = sorted(files)[jax.process_index()::jax.process_count()]
  todo = []
  for path, record in read_records(share).items():
    want = (record or {}).get("sha256")
    if want and _VERIFIED.get(path) != want:
      todo.append((path, want))
  if not todo:
    return

  def check(item):
    path, want = item
    try:
      return path, epath.Path(path).stat().length, file_sha256(path) == want, ""
    except OSError as e:   # a listing that changed, storage that failed
      return path, 0, False, f"{type(e).__name__}: {e}"

  start = time.monotonic()
  # Threads: hashlib and the reads release the GIL (gs:// reads overlap).
  with concurrent.futures.ThreadPoolExecutor(min(8, len(todo))) as pool:
    results = list(pool.map(check, todo))
  differ = [p for p, _, ok, why in results if not ok and not why]
  unread = [f"{p} ({why})" for p, _, ok, why in results if why]
  for (path, want), (_, _, ok, _) in zip(todo, results):
    if ok:
      _VERIFIED[path] = want
  if differ or unread:
    parts = []
    if differ:
      parts.append(f"{len(differ)} token file(s) no longer hold the bytes "
                   "their records' SHA-256 was computed on: "
                   f"{settings_lib.shorten(differ, 5)}")
    if unread:
      parts.append(f"{len(unread)} token file(s) could not be read to check "
                   f"them: {settings_lib.shorten(unread, 5)}")
    raise TokenFileError("; ".join(parts) + ". " + rewrite_hint())
  logging.info("Checked the SHA-256 of %d token file(s) (%.2f GB) in %.1f s.",
               len(todo), sum(r[1] for r in results) / 1e9,
               time.monotonic() - start)
