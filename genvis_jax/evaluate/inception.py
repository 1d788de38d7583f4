"""FID Inception features over the devices of a 1-D mesh (the network itself:
``genvis_jax/models/inception.py``; its weights: ``genvis_jax.convert.inception
.load_inception_params``)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from genvis_jax.core import overlap
from genvis_jax.core import padded
from genvis_jax.core import sharding
from genvis_jax.models.inception import (PREPROCESS, FIDInceptionV3,
                                         untrained, weights_fingerprint)


# --- batched, sharded feature extraction -------------------------------------------

class InceptionExtractor:
  """Runs the network on host batches, split over the devices of a 1-D mesh.

  ``extractor(images)`` takes (n <= batch_size, H, W, 3) uint8 (or [0, 1]
  float) numpy images and returns numpy {"pool", "spatial", "logits"} with n
  rows. Batches are zero-padded to ``batch_size`` (rounded up to a multiple of
  the device count) so one image size compiles once. Convolutions run at full
  float32 precision (no TF32 / bf16 passes) for reproducible statistics.
  Outputs are float32: pool (n, 2048), spatial (n, 2023), logits (n, 1008).
  Raises ``ValueError`` for an unknown ``preprocess`` (at construction) or
  a call with 0 or more than ``batch_size`` images.
  """

  # (pool, spatial) feature sizes: what reference statistics must match.
  feature_dims = (2048, 2023)

  def __init__(self, params, *, batch_size: int = 200, mesh=None,
               preprocess: str = "pytorch_fid"):
    if preprocess not in PREPROCESS:
      raise ValueError(f"Unknown Inception preprocess {preprocess!r}; choose "
                       f"one of {PREPROCESS}.")
    self.preprocess = preprocess
    self._weights_id = self._untrained = None
    self.mesh = sharding.auto_axes(mesh) or sharding.data_mesh(
        jax.local_devices())
    shards = self.mesh.size
    self.batch_size = -(-batch_size // shards) * shards
    self.data = sharding.batch_sharding(self.mesh)
    repl = sharding.replicated(self.mesh)
    self.params = jax.device_put(params, repl)
    model = FIDInceptionV3(preprocess=preprocess)

    def apply(p, x):
      with jax.default_matmul_precision("highest"):
        return model.apply({"params": p}, x)

    self._fn = jax.jit(apply, in_shardings=(repl, self.data),
                       out_shardings=self.data)

  @property
  def untrained(self) -> bool:
    """``models.inception.untrained`` of the parameters: random stand-ins."""
    if self._untrained is None:
      self._untrained = untrained(jax.device_get(self.params))
    return self._untrained

  @property
  def weights_id(self) -> str:
    """``weights_fingerprint`` of the parameters (computed on first use)."""
    if self._weights_id is None:
      self._weights_id = weights_fingerprint(self.params)
    return self._weights_id

  def __call__(self, images) -> dict[str, np.ndarray]:
    return self.dispatch(images)()

  def dispatch(self, images) -> Callable[[], dict[str, np.ndarray]]:
    """Sends a batch of 1..batch_size images to the devices and returns
    ``finish() -> {"pool", "spatial", "logits"}`` host arrays of its rows
    (``__call__``'s result): read back when called, so a caller that sends
    batch i + 1 before it finishes batch i keeps the devices busy while
    the host folds batch i into its statistics."""
    images = np.asarray(images)
    n = len(images)
    if images.dtype != np.uint8:
      images = images.astype(np.float32)
    images, _ = padded.pad_batch(images, self.batch_size)   # n in 1..batch_size
    out = self._fn(self.params, jax.device_put(images, self.data))
    for v in out.values():
      v.copy_to_host_async()
    return lambda: {k: np.asarray(v)[:n] for k, v in out.items()}


def pipelined(extractor, batches: Iterable) -> Iterator[tuple]:
  """``(batch, extractor(batch))`` for each of ``batches``, in order, one
  batch behind: batch i + 1 is on the devices (``dispatch``) while the
  caller folds batch i's features into its statistics and the next images
  are read."""
  def send(batch):
    finish = dispatch(extractor, batch)
    return lambda: (batch, finish())
  return overlap.ahead(batches, send)


def dispatch(extractor, images) -> Callable[[], dict[str, np.ndarray]]:
  """``extractor.dispatch(images)`` where it has one (``InceptionExtractor``);
  otherwise ``extractor(images)`` now, returned by ``finish``."""
  if hasattr(extractor, "dispatch"):
    return extractor.dispatch(images)
  out = extractor(images)
  return lambda: out
