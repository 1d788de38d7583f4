"""Fixed-size batches: a jitted program over any number of rows, compiled once.

Rows are cut into batches of one size, the last one zero-padded, so a program
sees one shape whatever the row count; the padding's outputs are dropped (or
masked out of statistics by the caller).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from genvis_jax.core import overlap


def pad_batch(x, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(n, ...) rows -> (zero-padded (size, ...), valid mask bool (size,)).

  ``x``: anything ``np.asarray`` takes, 1 <= n <= size rows; dtype kept.
  Raises ``ValueError`` for n outside 1..size.
  """
  x = np.asarray(x)
  n = len(x)
  if not 0 < n <= size:
    raise ValueError(f"Batch of {n} rows; expected 1..{size}.")
  mask = np.arange(size) < n
  if n < size:
    x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])
  return x, mask


def map_padded(fn: Callable, params, x, batch_size: int, *,
               prepare: Callable | None = None, in_flight: int = 4):
  """``fn(params, batch)`` over the rows of ``x``, in zero-padded batches.

  Args:
    fn: a jitted (params, (batch_size, ...) batch) -> pytree of arrays with
      one row per batch row. Built once by the caller: every call has one
      shape, so it compiles once.
    params: pytree put on a device once here (arrays already on a device stay
      there), not uploaded again with every batch.
    x: (N >= 1, ...) host rows (anything that slices, e.g. a numpy array).
    batch_size: rows per call, >= 1.
    prepare: host function applied to each slice of rows before padding
      (e.g. bytes -> float), so ``x`` is never converted whole.
    in_flight: batches dispatched ahead of the one read back: the host copies
      and the next batches' uploads overlap the device's work, while device
      memory holds at most ``in_flight + 1`` batches.
  Returns:
    ``fn``'s output pytree as numpy arrays of N rows, in ``x``'s order (the
    padding rows dropped).
  Raises:
    ValueError: for no rows or a batch size below 1.
  """
  n = len(x)
  if not n or batch_size < 1:
    raise ValueError(f"map_padded needs rows and a batch size >= 1, got "
                     f"{n} rows in batches of {batch_size}.")
  params = jax.device_put(params)

  def send(start):
    rows = x[start:start + batch_size]
    rows = rows if prepare is None else prepare(rows)
    out = fn(params, pad_batch(rows, batch_size)[0])
    return lambda: jax.device_get(out)
  done = list(overlap.ahead(range(0, n, batch_size), send, depth=in_flight))
  return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *done)
