"""Exact image counts for every evaluator: fixed-size padded batches + masks.

An evaluation covers exactly the requested number of images whatever the batch
size: the last batch is zero-padded to the full batch size (one compiled shape)
and a boolean mask keeps the padding out of every statistic. A source with
fewer images than requested is an error naming both counts, never a silent
smaller evaluation or a bare ``StopIteration``. Only a request for all images
(count 0) covers what the source yields, as an image folder skips files that
do not decode; the evaluators log how many were skipped. (``pad_batch`` and
``map_padded``, a jitted program over padded batches: ``core/padded.py``.)
``ProgressLog`` logs the rate and ETA of a long pass.
"""

from __future__ import annotations

import operator
import time
from typing import Iterable, Iterator

import numpy as np
from absl import logging

from genvis_jax.core.padded import pad_batch
from genvis_jax.errors import ConfigError, UserError


class NotEnoughImages(UserError, ValueError):
  """The data holds fewer images than the evaluation asks for."""


def check_batch_size(value, setting: str = "config.evaluate.batch_size") -> int:
  """``value`` as a batch size (a whole number >= 1). Raises ``ConfigError``
  naming ``setting``."""
  try:
    size = operator.index(value)   # ints and numpy ints, not 2.5 -> 2
  except TypeError:
    size = 0
  if size < 1:
    raise ConfigError(f"{setting}={value!r} must be a whole number of images, "
                      "at least 1.")
  return size


def check_count(requested: int | None, available: int, what: str,
                setting: str, may_skip: bool = False) -> int:
  """The number of images to evaluate: ``requested`` (None / 0 = all).

  ``may_skip``: ``available`` counts files, some of which may turn out
  unreadable when decoded (an image folder); the advice then says so.

  Raises ``NotEnoughImages`` naming both counts and ``setting`` (the config
  key or argument that lowers the request) when ``requested > available``,
  and also for a negative ``requested`` or when there are no images at all.
  """
  if requested is None or requested == 0:
    n = available
  elif requested < 0:
    raise NotEnoughImages(f"{setting}={requested}: the image count must be >= 0 "
                          "(0 = all).")
  elif requested > available:
    raise NotEnoughImages(
        f"{what} has {available} images but {requested} were requested: lower "
        f"{setting} to at most {available}"
        + (" (fewer if some of its files are unreadable; 0 = every readable "
           "one)" if may_skip else " (0 = all)")
        + " or point it at a larger set.")
  else:
    n = int(requested)
  if n == 0:
    raise NotEnoughImages(f"{what} has no images to evaluate.")
  return n


def exact_batches(batches: Iterable, total: int, batch_size: int, what: str,
                  setting: str, key: str | None = None, up_to: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Re-blocks ``batches`` into exactly ``total`` rows in padded batches.

  Args:
    batches: iterable of arrays (or dicts; ``key`` picks the array) of any
      leading sizes, e.g. a data pipeline that keeps its last partial batch.
    total: rows to yield in all; later rows of the source are not read.
    batch_size: rows per yielded batch (the last one is zero-padded).
    what, setting: name the source and the config key in the error raised when
      the source ends before ``total`` rows.
    up_to: ``total`` is an upper bound (the request was "all" and the
      source may skip unreadable files): a source ending early ends the
      batches instead of raising. Callers count the rows they get.
  Yields:
    (padded (batch_size, ...) batch, valid mask (batch_size,) bool, n_valid),
    the batch in the source's dtype, zeros in the padding rows.
  Raises:
    NotEnoughImages: the source ends before ``total`` rows (unless ``up_to``).
  """
  pending, have, done = [], 0, 0
  it = iter(batches)
  while done < total:
    want = min(batch_size, total - done)
    while have < want:
      try:
        item = next(it)
      except StopIteration:
        if not up_to:
          raise NotEnoughImages(
              f"{what} ended after {done + have} images but {total} were "
              "requested (an image folder's unreadable files, if any, are "
              "skipped; see the warnings): "
              f"lower {setting} to at most {done + have} (0 = every "
              "readable image) or use a larger set.") from None
        want, total = have, done + have   # what is left is the last batch
        break
      arr = np.asarray(item[key] if key is not None else item)
      if len(arr):
        pending.append(arr)
        have += len(arr)
    if not want:
      return
    cat = np.concatenate(pending) if len(pending) > 1 else pending[0]
    rows, rest = cat[:want], cat[want:]
    pending, have = ([rest] if len(rest) else []), len(rest)
    padded, mask = pad_batch(rows, batch_size)
    done += want
    yield padded, mask, want


class ProgressLog:
  """Logs images done, images/s and ETA every ``every`` batches."""

  def __init__(self, what: str, total: int, every: int = 20):
    self.what, self.total, self.every = what, total, every
    self.t0, self.calls, self.done = time.perf_counter(), 0, 0

  def __call__(self, n: int) -> None:
    self.done += n
    self.calls += 1
    if self.calls % self.every and self.done < self.total:
      return
    dt = max(time.perf_counter() - self.t0, 1e-9)
    rate = self.done / dt
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    logging.info("%s: %d/%d images, %.1f img/s, ETA %.0f s", self.what,
                 self.done, self.total, rate, eta)
