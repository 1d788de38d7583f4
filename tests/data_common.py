"""Shared pieces of the input-pipeline tests (``test_data*.py``)."""

from configs import base


def data_config(**kw):
  """The default ``config.data`` at 32 px, light on threads, with ``kw``."""
  c = base.get_config().data
  c.image_size = 32
  c.prefetch = 2
  c.read_threads = 4
  c.update(kw)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def keys(batch):
  """One hashable key per example (its pixels / tokens)."""
  x = batch["image"] if "image" in batch else batch["tokens"]
  return [row.tobytes() for row in x]
