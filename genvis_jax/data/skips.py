"""Unreadable records in the input pipeline, counted and survived.

An image file that fails to decode (or, in training, to give the random
crop) becomes a skip marker record
(``transforms.SKIPPED``) instead of an error: the per-record transforms pass
markers through (``PassSkipped``), ``SkipIterDataset`` drops them and keeps
the distinct paths and the records read in the iterator state (so counts
survive checkpoint restores), and ``EpochLogIterDataset`` logs the count as
passes over the shard complete. A shard with nothing readable raises
``DataNotFoundError`` instead of looping.
"""

from __future__ import annotations

import time

from absl import logging
import grain
import numpy as np

from genvis_jax.data import sources, transforms
from genvis_jax.errors import ConfigError

SKIPPED = transforms.SKIPPED      # marker key of an unreadable file's record
FILES_KEY = "skipped_files"       # iterator state: distinct unreadable paths
# Crop misfits that stop the run when they are most records read: enough that
# a few odd images among the first cannot.
UNFIT_LIMIT = 16
READ_KEY = "records_read"         # iterator state: records read, skips included


class PassSkipped(grain.transforms.Map):
  """Applies ``inner`` (a Map) to decoded records; passes skip markers on."""

  def __init__(self, inner):
    self.inner = inner

  def map(self, record):
    return record if SKIPPED in record else self.inner.map(record)


class PassSkippedRandom(grain.transforms.RandomMap):
  """Applies ``inner`` (a RandomMap) to decoded records; passes skip markers on."""

  def __init__(self, inner):
    self.inner = inner

  def random_map(self, record, rng: np.random.Generator):
    return record if SKIPPED in record else self.inner.random_map(record, rng)


class _SkipIterator(grain.DatasetIterator):
  """Drops skip markers (and None records) and keeps, in its state, the
  sorted distinct paths skipped and the number of records read.

  ``limit`` consecutive skipped records (two passes over a shard, so a
  reshuffled epoch cannot hide its one readable file) mean nothing in the
  shard is readable: a ``DataNotFoundError`` instead of an endless loop.
  Images the training crop cannot cut (``transforms.UNFIT``) making most of
  the first ones read mean a crop setting that does not fit the data: a
  ``ConfigError`` naming it, before every file is read twice.
  """

  def __init__(self, parent, limit: int = 0, where: str = ""):
    super().__init__(parent)
    self._files: set[str] = set()
    self._read = 0
    self._unfit = 0   # this iterator's, from its start (not restored)
    self._limit, self._where = limit, where

  def __next__(self):
    run = 0
    while True:
      record = next(self._parent)
      self._read += 1
      if record is not None and SKIPPED not in record:
        return record
      run += 1
      if record is not None and record.get(transforms.UNFIT):
        self._unfit += 1
        if self._unfit >= UNFIT_LIMIT and 2 * self._unfit > self._read:
          raise ConfigError(
              f"Most images of {self._where} cannot give the training crop: "
              f"{self._unfit} of the first {self._read} read were skipped, "
              f"e.g. {record[SKIPPED]}: {record['error']}")
      if self._limit and run >= self._limit:
        raise sources.DataNotFoundError(
            f"No readable image in {self._where}: the last {run} records read "
            f"(every file of this process's shard, twice) failed to decode "
            f"(or to crop: the warnings above say why); "
            f"{len(self._files)} distinct file(s) skipped, e.g. "
            f"{sorted(self._files)[:3]}. Check that config.data.path holds "
            "images PIL can open.")
      if record is not None and record[SKIPPED] not in self._files:
        self._files.add(record[SKIPPED])
        logging.warning("Skipping image %s (%s); %d distinct "
                        "file(s) skipped so far.", record[SKIPPED],
                        record["error"], len(self._files))

  def get_state(self):
    return {"parent": self._parent.get_state(), FILES_KEY: sorted(self._files),
            READ_KEY: self._read}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    # Older states kept only a count of skip events: start the set afresh.
    self._files = set(state.get(FILES_KEY, ()))
    self._read = int(state.get(READ_KEY, 0))


class SkipIterDataset(grain.IterDataset):

  def __init__(self, parent, limit: int = 0, where: str = ""):
    super().__init__(parent)
    self._limit, self._where = limit, where

  def __iter__(self):
    return _SkipIterator(self._parent.__iter__(), self._limit, self._where)


def _collect(tree, key, out: list) -> list:
  """Every value stored under ``key`` anywhere in a nested state tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.append(v) if k == key else _collect(v, key, out)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      _collect(v, key, out)
  return out


def skipped_files(state) -> set[str]:
  """Distinct unreadable paths in an iterator state (all workers together)."""
  return set().union(*map(set, _collect(state, FILES_KEY, [])))


def records_read(state) -> int:
  """Records (skips included) read for the batches consumed so far."""
  return sum(_collect(state, READ_KEY, []))


# At most one "epoch done" line per this many seconds (and the last one): a
# small data set (runlocal, the demos) completes an epoch every few steps.
EPOCH_LOG_INTERVAL_S = 60.0


class _EpochLogIterator(grain.DatasetIterator):
  """Logs ``num_skipped_files`` when the consumed batches complete a pass
  over this process's shard (state as of the consumed batch, not the reads
  running ahead in prefetch buffers or worker processes), at most once per
  ``EPOCH_LOG_INTERVAL_S``."""

  def __init__(self, parent, shard: int, split: str):
    super().__init__(parent)
    self._shard, self._split = max(shard, 1), split
    self._epoch = 0
    self._logged_at = -float("inf")

  def __next__(self):
    try:
      batch = next(self._parent)
    except StopIteration:
      self._log_epochs(final=True)
      raise
    self._log_epochs()
    return batch

  def _log_epochs(self, final=False):
    state = self._parent.get_state()
    read = records_read(state)
    epoch = read // self._shard + (1 if final and read % self._shard else 0)
    if epoch > self._epoch:
      self._epoch = epoch
      now = time.monotonic()
      if not final and now - self._logged_at < EPOCH_LOG_INTERVAL_S:
        return
      self._logged_at = now
      logging.info("Input pipeline %r: epoch %d done, num_skipped_files=%d",
                   self._split, epoch, len(skipped_files(state)))

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._epoch = records_read(state) // self._shard


class EpochLogIterDataset(grain.IterDataset):

  def __init__(self, parent, shard: int, split: str):
    super().__init__(parent)
    self._shard, self._split = shard, split

  def __iter__(self):
    return _EpochLogIterator(self._parent.__iter__(), self._shard, self._split)
