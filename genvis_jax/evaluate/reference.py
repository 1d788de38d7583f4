"""``config.evaluate.kind == "reference"``: compute an ADM-format reference
batch (``adm_reference.py``, the format) of a data set split, for
``--config.evaluate.reference`` of a later ``kind=generation`` run.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from absl import logging

from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import pixels
from genvis_jax.evaluate import adm_reference as ref_lib
from genvis_jax.evaluate import batching
from genvis_jax.evaluate import fid as fid_lib
from genvis_jax.evaluate import inception as inception_lib


def dataset_images(data_config, split: str, batch_size: int,
                   num_images: int | None = None,
                   setting: str = "num_images"
                   ) -> tuple[int, Iterator[np.ndarray]]:
  """(count, iterator of uint8 (b <= batch_size, S, S, 3) batches) of exactly
  the first ``num_images`` images of ``split`` in order (None / 0 = all),
  centre-cropped to ``data_config.image_size`` (``data_config.center_crop``,
  ADM's by default). With "all", ``count`` is the
  split's size, and the iterator yields fewer where unreadable files are
  skipped (count what it yields).

  Raises ``batching.NotEnoughImages`` (naming both counts and ``setting``) when
  the split has fewer images than requested.
  """
  # Grain only where images are read: evaluating samples against a saved
  # reference runs on GPU machines without it.
  from genvis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  it, info = data_lib.create_dataset(
      data_config, split=split, global_batch_size=batch_size, seed=0,
      train=False, process_index=0, process_count=1, value_range=(0.0, 1.0),
      drop_remainder=False, batch_setting="config.evaluate.batch_size")
  what = f"split {split!r} of the {data_config.source!r} data"
  total = batching.check_count(num_images, info.num_examples, what, setting,
                               may_skip=info.may_skip)

  def gen():
    for images, _, n in batching.exact_batches(it, total, batch_size, what,
                                               setting, key="image",
                                               up_to=not num_images):
      # The pipeline's float conversion is x / 255: rounding back is exact.
      yield pixels.to_uint8(images[:n], pixels.UNIT, "round")
  return total, gen()


class StoredSubset:
  """A seeded uniform subset of ``n`` of the rows streamed past it
  (reservoir sampling, Vitter's Algorithm R): what a reference keeps for
  precision / recall. Not the first images: an image folder (and most
  splits) lists its images class by class, and the first 10,000 of
  ImageNet's 50 per class are its first 200 classes, whose manifold leaves
  samples of the other 800 outside (precision 0.375 for samples drawn as
  the data, 2 classes of 5 stored). Chosen among the rows read, so
  unreadable files skipped leave it full."""

  def __init__(self, n: int, seed: int = 0):
    self.n, self.seen = max(int(n), 0), 0
    self._rng = np.random.default_rng(seed)
    self._slots: dict[str, np.ndarray] = {}
    self._index = np.zeros(self.n, np.int64)

  def offer(self, **rows) -> None:
    """Streams ``rows`` (arrays of one length B, aligned) past the subset."""
    b = len(next(iter(rows.values())))
    pos = np.arange(self.seen, self.seen + b)
    self.seen += b
    if not self.n:
      return
    for k, v in rows.items():   # zeros: pages never filled are not touched
      self._slots.setdefault(k, np.zeros((self.n, *v.shape[1:]), v.dtype))
    fill = pos < self.n   # the first n rows go in as they come
    for k, v in rows.items():
      self._slots[k][pos[fill]] = v[fill]
    self._index[pos[fill]] = pos[fill]
    later = np.flatnonzero(~fill)
    if not len(later):
      return
    # Row i (0-based) replaces slot j ~ U{0..i} when j < n, in order.
    slot = self._rng.integers(0, pos[later] + 1)
    for i, j in zip(later[slot < self.n], slot[slot < self.n]):
      for k, v in rows.items():
        self._slots[k][j] = v[i]
      self._index[j] = pos[i]

  def result(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({name: the kept rows in stream order}, their positions)."""
    k = min(self.seen, self.n)
    order = np.argsort(self._index[:k], kind="stable")
    return ({name: a[:k][order] for name, a in self._slots.items()},
            self._index[:k][order])


def stored_indices(total: int, num_stored: int, seed: int = 0) -> np.ndarray:
  """The sorted positions ``StoredSubset`` keeps of ``total`` rows."""
  subset = StoredSubset(num_stored, seed)
  subset.offer(row=np.zeros(total, np.int8))
  return subset.result()[1]


def compute_reference(data_config, inception_params, out_path: str, *,
                      split: str | None = None, num_images: int | None = None,
                      num_stored_images: int = 10000, batch_size: int = 200,
                      preprocess: str = ref_lib.ADM_PREPROCESS, mesh=None,
                      extractor=None) -> str:
  """Writes an ADM-format reference of a data set split.

  ``preprocess``: the Inception resize, ``adm_tf`` by default as
  ``--config.evaluate.kind=reference`` (its ``auto``) and ADM's evaluator
  and reference batches; ``pytorch_fid`` for a reference to compare with
  pytorch-fid's numbers. The file records it and generation scoring follows.

  Statistics (mu, sigma, mu_s, sigma_s) cover exactly ``num_images`` images
  (None / 0 = every image of the split that decodes; more than the split has
  is an error), at any
  ``batch_size``; ``num_stored_images`` of them are kept as ``arr_0`` with
  their pool features (ADM's ImageNet batch keeps 10,000), a seeded subset
  spread over the images read (``StoredSubset``) in split order. The file records
  ``preprocess``, the Inception weights' fingerprint and the image count.
  ``extractor`` replaces the Inception (see ``generation.evaluate_samples``).
  Returns ``out_path``. Raises ``batching.NotEnoughImages`` when the split
  has fewer images than requested, or fewer than 2 readable ones.
  """
  split = split or data_config.eval_split
  if extractor is None:
    extractor = inception_lib.InceptionExtractor(
        inception_params, batch_size=batch_size, mesh=mesh,
        preprocess=preprocess)
  preprocess = getattr(extractor, "preprocess", preprocess)
  pool, spatial = fid_lib.StreamingStats(), fid_lib.StreamingStats()
  stored = StoredSubset(num_stored_images)
  total, batches = dataset_images(data_config, split, extractor.batch_size,
                                  num_images)
  progress = batching.ProgressLog(f"reference {split}", total)
  for images, out in inception_lib.pipelined(extractor, batches):
    pool.update(out["pool"])
    spatial.update(out["spatial"])
    stored.offer(images=images, pool=out["pool"])
    progress(len(images))
  kept_rows, _ = stored.result()
  kept = len(kept_rows.get("images", ()))
  if pool.count < total:
    logging.warning("reference %s: %d of its %d files are unreadable and were "
                    "skipped; the statistics cover the %d that were read.",
                    split, total - pool.count, total, pool.count)
  if pool.count < 2:
    raise batching.NotEnoughImages(
        f"split {split!r} has {pool.count} readable image(s); statistics need "
        "at least 2.")
  mu, sigma = pool.result()
  mu_s, sigma_s = spatial.result()
  logging.info("reference %s: statistics of %d images, %d stored", split,
               pool.count, kept)
  return ref_lib.save_reference(
      out_path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
      images=kept_rows["images"] if kept else None,
      pool_features=kept_rows["pool"] if kept else None,
      preprocess=preprocess,
      inception_weights=getattr(extractor, "weights_id", None),
      num_images=pool.count)


def check_config(config, workdir: str | None = None) -> str:
  """What ``evaluate`` refuses before reading any file (image data, Inception
  weights set, a known preprocess); returns the preprocess it computes with.
  A runner of several jobs (the demo) checks each first."""
  del workdir
  # Imports what generation evaluation avoids (Grain; the converter).
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel
  from genvis_jax.convert import inception  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import sources  # pylint: disable=import-outside-toplevel
  ev = config.evaluate
  if config.data.get("source") not in sources.SOURCES:
    sources.check_source(
        config.data.get("source"), "config.data",
        "config.evaluate.kind=reference computes Inception statistics of "
        "images")
  if config.data.get("source") == "tokens":
    raise errors.ConfigError(
        "config.evaluate.kind=reference computes Inception statistics of "
        "images, and config.data reads token files (this generator's "
        "training data). Point it at the images: --config.data.source=tfds "
        "(with data.name and data.path), image_folder (data.path) or demo.")
  if not ev.get("inception"):
    raise errors.ConfigError(
        "config.evaluate.inception is not set: the reference statistics are "
        f"Inception features; {inception.setting_howto()}.")
  preprocess = ev.get("preprocess", ref_lib.AUTO)
  if preprocess in ("", ref_lib.AUTO):
    preprocess = ref_lib.ADM_PREPROCESS
  if preprocess not in ref_lib.PREPROCESS:
    raise errors.ConfigError(
        f"config.evaluate.preprocess={preprocess!r}; use one of "
        f"{(ref_lib.AUTO,) + ref_lib.PREPROCESS}.")
  return preprocess


def evaluate(config, workdir: str) -> dict:
  """``config.evaluate.kind == "reference"``: the ADM-format reference of
  ``config.data``'s eval split, for ``--config.evaluate.reference`` of a later
  ``kind=generation`` run on samples of a model trained on that data.

  Reads ``config.evaluate``: inception (weights, as for generation),
  num_images (0 = every readable image of the split), batch_size, preprocess
  ("auto" = ``adm_tf``, the resize of ADM's evaluator and its reference
  batches) and num_stored_images (images kept as ``arr_0`` for precision /
  recall; default 10,000 as ADM's ImageNet batch; a seeded subset spread
  over the split, ``StoredSubset``). Images go through the
  pipeline's eval transforms (``config.data.center_crop``, ADM's by default).
  Writes ``workdir/reference.npz`` (replacing one there: it is derived data)
  and ``workdir/metrics.json`` (its path, image count, preprocess). Raises
  ``ConfigError`` without Inception weights, for token data, or a
  preprocess outside "auto" / ``ref_lib.PREPROCESS``; ``DataConfigError`` for an
  unknown ``config.data.source``; ``batching.NotEnoughImages`` when the
  split has fewer images than requested.
  """
  from genvis_jax.convert import inception  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate import report  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import sources  # pylint: disable=import-outside-toplevel
  preprocess = check_config(config)
  ev = config.evaluate
  params = inception.load_inception_params(ev.inception)
  files.makedirs(workdir)
  path = compute_reference(
      config.data, params, os.path.join(workdir, "reference.npz"),
      num_images=ev.get("num_images", 0) or None,
      num_stored_images=int(ev.get("num_stored_images", 10_000)),
      batch_size=int(ev.get("batch_size", 200)), preprocess=preprocess)
  # Read back where it was written: a workdir of each host's own holds it on
  # process 0's only.
  def summary():
    ref = ref_lib.load_reference(path)
    return json.dumps([int(ref.num_images or 0), ref_lib.describe(ref)])
  count, line = json.loads(multihost.string_on_process_0(summary))
  results = {"reference": path, "num_images": count,
             "preprocess": preprocess, "split": config.data.eval_split}
  if config.data.source == "image_folder":   # warned of when it was read
    note = sources.held_out_note(config.data.path, config.data.eval_split,
                                 "config.data",
                                 train_split=config.data.get("split", "train"))
    results["caveats"] = [note] if note else []
  return report.write(workdir, results, f"reference: {line}; use "
                      f"--config.evaluate.reference={path}")
