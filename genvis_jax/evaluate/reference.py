"""ADM reference batches: read and write the ``.npz`` format, compute our own,
and decide which Inception preprocessing a reference needs.

Format of openai/guided-diffusion's reference batches (e.g.
``VIRTUAL_imagenet256_labeled.npz``):
  arr_0          uint8 (N, H, W, 3)   reference images; precision/recall use
                                      their Inception pool features
  mu, sigma      float64 (2048,), (2048, 2048)   pool statistics (FID)
  mu_s, sigma_s  float64 (2023,), (2023, 2023)   spatial statistics (sFID)
ADM computed these statistics with TensorFlow's Inception graph, whose resize is
TF1's legacy bilinear one: our ``adm_tf`` preprocessing (``models/inception.py``).

Files written here record how they were made (ADM's evaluator ignores extra
keys):
  preprocess         str  "pytorch_fid" | "adm_tf"
  inception_weights  str  fingerprint of the Inception parameters
                          (``inception.weights_fingerprint``)
  num_images         int  images the statistics cover
  pool_features      float32 (N, 2048), the features of ``arr_0`` (skips
                     recomputing them)

``resolve_preprocess`` picks the samples' preprocessing from that record:
"auto" takes the recorded one, ``adm_tf`` for an ADM-format file, and
``pytorch_fid`` with a logged warning for a file of unknown origin; an explicit
choice that contradicts the record is refused (``ProtocolMismatch``), since
samples and reference through two different resizes bias FID silently.

Sample files use the same layout (``arr_0`` uint8), streamed by ``npz`` so
50,000 images never sit in memory at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterator

import numpy as np
from absl import logging
from etils import epath

from genvis_jax.core import files
from genvis_jax.core import multihost
from genvis_jax.core import pixels
from genvis_jax.errors import UserError
from genvis_jax.evaluate import batching
from genvis_jax.evaluate import fid as fid_lib
from genvis_jax.evaluate import npz
from genvis_jax.evaluate import inception as inception_lib

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
AUTO = "auto"
PREPROCESS = ("pytorch_fid", "adm_tf")   # inception.PREPROCESS (no jax import)
ADM_PREPROCESS = "adm_tf"
DEFAULT_PREPROCESS = "pytorch_fid"
ADM_DIMS = (2048, 2023)   # pool, spatial feature sizes of ADM's statistics


class ProtocolMismatch(UserError, ValueError):
  """Samples would be measured differently from the reference's statistics."""


# --- reference files --------------------------------------------------------------

@dataclasses.dataclass
class Reference:
  """Contents of a reference ``.npz`` except the images themselves."""
  path: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  images: npz.NpzArray | None = None           # arr_0, streamed on demand
  pool_features: np.ndarray | None = None  # features of arr_0, if stored
  preprocess: str | None = None            # recorded preprocessing
  inception_weights: str | None = None     # recorded weights fingerprint
  num_images: int | None = None            # recorded statistics count

  @property
  def has_stats(self) -> bool:
    """Whether the file holds the statistics (mu, sigma, mu_s, sigma_s)."""
    return self.mu is not None and self.mu_s is not None

  @property
  def origin(self) -> str:
    """How the statistics were made, as far as the file tells:
      "recorded"  written here: ``preprocess`` (and weights, count) recorded;
      "adm"       ADM's layout (2048-d mu/sigma + 2023-d mu_s/sigma_s, the
                  sFID layer only ADM's evaluator reads) without our record:
                  made by ADM's TF graph (adm_tf);
      "images"    images only: statistics are computed here from them, with
                  the samples' own preprocessing (consistent by construction);
      "unknown"   statistics of no known making.
    """
    if self.preprocess is not None:
      return "recorded"
    if not self.has_stats:
      return "images"
    if (self.mu.shape[0], self.mu_s.shape[0]) == ADM_DIMS:
      return "adm"
    return "unknown"


def load_reference(path: str) -> Reference:
  """Reads statistics (float64) and the image header of an ADM-format
  reference. Raises ``npz.NpzFileError`` for a missing or unreadable file,
  ``npz.NpzContentError`` for some but not all of ``STAT_KEYS``, images that
  are not uint8 (N, H, W, 3), or neither statistics nor images."""
  if not epath.Path(path).exists():
    raise npz.NpzFileError(
        f"No reference batch at {path!r}: download ADM's (e.g. "
        "VIRTUAL_imagenet256_labeled.npz) or write one with "
        "--config.evaluate.kind=reference.")
  ref = Reference(path)
  with npz.open_npz(path, "config.evaluate.reference") as data:
    keys = set(data.files)
    present = [k for k in STAT_KEYS if k in keys]
    if present and len(present) != len(STAT_KEYS):
      raise npz.NpzContentError(
          f"{path} (config.evaluate.reference) has {present} but not all of "
          f"{STAT_KEYS}: ADM's evaluator needs the pool statistics (FID) and "
          "the spatial ones (sFID); a pytorch-fid / torch-fidelity file of "
          "mu and sigma holds only the first. Use ADM's reference batch "
          "(e.g. VIRTUAL_imagenet256_labeled.npz) or one written by "
          "--config.evaluate.kind=reference.")
    for k in present:
      setattr(ref, k, np.asarray(data[k], np.float64))
      if not np.isfinite(getattr(ref, k)).all():
        raise npz.NpzContentError(
            f"{path} (config.evaluate.reference): {k!r} holds NaN or Inf, so "
            "no FID can be computed against it: the file is damaged or was "
            "written from non-finite features. Fetch it again or write a new "
            "one with --config.evaluate.kind=reference.")
    if present:
      _check_stat_shapes(path, ref)
    if "pool_features" in keys:
      ref.pool_features = np.asarray(data["pool_features"], np.float32)
    if "preprocess" in keys:
      ref.preprocess = str(data["preprocess"])
    if "inception_weights" in keys:
      ref.inception_weights = str(data["inception_weights"])
    if "num_images" in keys:
      ref.num_images = int(data["num_images"])
  if "arr_0" in keys:
    ref.images = npz.open_images(path, setting="config.evaluate.reference")
  if not ref.has_stats and ref.images is None:
    raise npz.NpzContentError(
        f"{path}: neither statistics ({STAT_KEYS}) nor images ('arr_0'): not "
        "an ADM reference batch (config.evaluate.reference).")
  return ref


def _check_stat_shapes(path: str, ref: Reference) -> None:
  """Raises ``npz.NpzContentError`` unless mu / mu_s are vectors and sigma /
  sigma_s the square matrices of their sizes (a damaged or hand-made file
  failed only after every feature was computed)."""
  for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
    mu, sigma = getattr(ref, m), getattr(ref, s)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise npz.NpzContentError(
          f"{path} (config.evaluate.reference): {m} {mu.shape} and {s} "
          f"{sigma.shape} are not a mean vector and its covariance: the file "
          "is damaged or not a reference batch. Fetch it again or write one "
          "with --config.evaluate.kind=reference.")


def check_feature_dims(ref: Reference, dims, path: str) -> None:
  """Raises ``npz.NpzContentError`` when the reference's statistics are not
  of the (pool, spatial) feature sizes ``dims`` the extractor computes (None:
  unknown, not checked): statistics of another network or layer, refused
  before any image is measured."""
  if dims is None or not ref.has_stats:
    return
  got = (ref.mu.shape[0], ref.mu_s.shape[0])
  if got != tuple(dims):
    raise npz.NpzContentError(
        f"{path} (config.evaluate.reference) holds statistics of {got[0]} "
        f"pool and {got[1]} spatial features, but the FID Inception computes "
        f"{dims[0]} and {dims[1]}: they come from another network or layer. "
        "Use ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or "
        "write one with --config.evaluate.kind=reference.")


def save_reference(path: str, *, mu, sigma, mu_s, sigma_s, images=None,
                   pool_features=None, preprocess: str | None = None,
                   inception_weights: str | None = None,
                   num_images: int | None = None) -> str:
  """Writes an ADM-format reference ``.npz`` (uncompressed, streamable) with
  the record of how it was made (``preprocess``, ``inception_weights``,
  ``num_images``; see the module docstring); returns ``path``. Raises
  ``ValueError`` for an unknown ``preprocess`` or images that are not uint8
  (N, H, W, 3)."""
  if preprocess is not None and preprocess not in PREPROCESS:
    raise ValueError(f"Unknown preprocess {preprocess!r}; choose one of "
                     f"{PREPROCESS}.")
  arrays = {"mu": np.float64(mu), "sigma": np.float64(sigma),
            "mu_s": np.float64(mu_s), "sigma_s": np.float64(sigma_s)}
  if images is not None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                       f"{images.shape}.")
    arrays["arr_0"] = images
  if pool_features is not None:
    arrays["pool_features"] = np.float32(pool_features)
  if preprocess is not None:
    arrays["preprocess"] = np.array(preprocess)
  if inception_weights is not None:
    arrays["inception_weights"] = np.array(inception_weights)
  if num_images is not None:
    arrays["num_images"] = np.int64(num_images)
  # Every process of a job computed it; process 0 writes it.
  multihost.write_on_process_0(path, lambda tmp: np.savez(tmp, **arrays))
  return path


# --- the measurement protocol ---------------------------------------------------------

def resolve_preprocess(ref: Reference, requested: str | None = AUTO,
                       setting: str = "config.evaluate.preprocess") -> str:
  """The Inception preprocessing that measures samples like ``ref``.

  ``requested`` "auto" (or None / "") follows the reference: its recorded
  preprocessing, ``adm_tf`` for an ADM-format file (ADM's TF graph), and
  ``pytorch_fid`` for images-only files or, with a logged warning, files of
  unknown origin. An explicit value is used as given unless it contradicts a
  recorded or ADM preprocessing: then ``ProtocolMismatch`` names both and the
  fix (``setting`` is the knob named in the message). A value that is none
  of "auto", ``PREPROCESS`` raises ``ProtocolMismatch`` too.
  """
  requested = requested or AUTO
  if requested not in (AUTO,) + PREPROCESS:
    raise ProtocolMismatch(f"Unknown {setting} {requested!r}; choose one of "
                           f"{(AUTO,) + PREPROCESS}.")
  origin = ref.origin
  if origin in ("recorded", "adm"):
    expected = ref.preprocess if origin == "recorded" else ADM_PREPROCESS
    if requested not in (AUTO, expected):
      made = (f"records preprocess {expected!r}" if origin == "recorded" else
              "is an ADM reference batch (statistics from TensorFlow's "
              f"Inception graph: preprocess {expected!r})")
      raise ProtocolMismatch(
          f"{ref.path} {made}, but "
          f"{setting}={requested!r}: samples and reference would go through "
          f"two different resizes and FID would be biased. Set {setting}=auto "
          f"(or {expected!r}), or compute a reference with "
          f"preprocess={requested!r} (--config.evaluate.kind=reference with "
          f"{setting}={requested}).")
    return expected
  if origin == "unknown":
    chosen = DEFAULT_PREPROCESS if requested == AUTO else requested
    logging.warning(
        "%s: statistics of unknown origin (no recorded preprocess, not ADM's "
        "layout); measuring samples with preprocess %r. If the reference was "
        "made otherwise, FID is biased: set %s or recompute the reference.",
        ref.path, chosen, setting)
    return chosen
  return DEFAULT_PREPROCESS if requested == AUTO else requested


def check_inception_weights(ref: Reference, weights_id: str | None) -> None:
  """Refuses a reference recorded with other Inception weights than the ones
  measuring the samples (when both fingerprints are known):
  ``ProtocolMismatch``."""
  if ref.inception_weights is None or weights_id is None:
    return
  if ref.inception_weights != weights_id:
    raise ProtocolMismatch(
        f"{ref.path} was made with Inception weights {ref.inception_weights} "
        f"but the samples are measured with weights {weights_id}: features of "
        "two networks are not comparable. Use the weights the reference was "
        "made with (config.evaluate.inception) or recompute the reference "
        "with these (--config.evaluate.kind=reference with the same "
        "--config.evaluate.inception).")


def describe(ref: Reference) -> str:
  """One line on where a reference's statistics come from (for logs)."""
  count = (ref.num_images if ref.num_images is not None else
           len(ref.images) if ref.images is not None and not ref.has_stats
           else "?")
  return (f"{ref.path}: origin {ref.origin}, statistics of {count} images, "
          f"{len(ref.images) if ref.images is not None else 0} stored images, "
          f"preprocess {ref.preprocess or '-'}, Inception weights "
          f"{ref.inception_weights or '-'}")


# --- computing our own reference ----------------------------------------------------

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
      drop_remainder=False)
  what = f"split {split!r} of the {data_config.source!r} data"
  total = batching.check_count(num_images, info.num_examples, what, setting,
                               may_skip=data_config.source == "image_folder")

  def gen():
    for images, _, n in batching.exact_batches(it, total, batch_size, what,
                                               setting, key="image",
                                               up_to=not num_images):
      # The pipeline's float conversion is x / 255: rounding back is exact.
      yield pixels.to_uint8(images[:n], pixels.UNIT, "round")
  return total, gen()


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


def compute_reference(data_config, inception_params, out_path: str, *,
                      split: str | None = None, num_images: int | None = None,
                      num_stored_images: int = 10000, batch_size: int = 200,
                      preprocess: str = ADM_PREPROCESS, mesh=None,
                      extractor=None) -> str:
  """Writes an ADM-format reference of a data set split.

  ``preprocess``: the Inception resize, ``adm_tf`` by default as
  ``--config.evaluate.kind=reference`` (its ``auto``) and ADM's evaluator
  and reference batches; ``pytorch_fid`` for a reference to compare with
  pytorch-fid's numbers. The file records it and generation scoring follows.

  Statistics (mu, sigma, mu_s, sigma_s) cover exactly ``num_images`` images
  (None / 0 = every image of the split that decodes; more than the split has
  is an error), at any
  ``batch_size``; the first ``num_stored_images`` are kept as ``arr_0`` with
  their pool features (ADM's ImageNet batch keeps 10,000). The file records
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
  kept_images, kept_feats = [], []
  kept = 0
  total, batches = dataset_images(data_config, split, extractor.batch_size,
                                  num_images)
  progress = ProgressLog(f"reference {split}", total)
  for images, out in inception_lib.pipelined(extractor, batches):
    pool.update(out["pool"])
    spatial.update(out["spatial"])
    if kept < num_stored_images:
      take = min(num_stored_images - kept, len(images))
      kept_images.append(images[:take])
      kept_feats.append(out["pool"][:take])
      kept += take
    progress(len(images))
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
  return save_reference(
      out_path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
      images=np.concatenate(kept_images) if kept_images else None,
      pool_features=np.concatenate(kept_feats) if kept_feats else None,
      preprocess=preprocess,
      inception_weights=getattr(extractor, "weights_id", None),
      num_images=pool.count)


def evaluate(config, workdir: str) -> dict:
  """``config.evaluate.kind == "reference"``: the ADM-format reference of
  ``config.data``'s eval split, for ``--config.evaluate.reference`` of a later
  ``kind=generation`` run on samples of a model trained on that data.

  Reads ``config.evaluate``: inception (weights, as for generation),
  num_images (0 = every readable image of the split), batch_size, preprocess
  ("auto" = ``adm_tf``, the resize of ADM's evaluator and its reference
  batches) and num_stored_images (images kept as ``arr_0`` for precision /
  recall; default 10,000 as ADM's ImageNet batch). Images go through the
  pipeline's eval transforms (``config.data.center_crop``, ADM's by default).
  Writes ``workdir/reference.npz`` (replacing one there: it is derived data)
  and ``workdir/metrics.json`` (its path, image count, preprocess). Raises
  ``ConfigError`` without Inception weights, for token data, or a
  preprocess outside "auto" / ``PREPROCESS``; ``DataConfigError`` for an
  unknown ``config.data.source``; ``batching.NotEnoughImages`` when the
  split has fewer images than requested.
  """
  # Imports what generation evaluation avoids (Grain; the converter).
  from genvis_jax import errors  # pylint: disable=import-outside-toplevel
  from genvis_jax.convert import inception  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate import report  # pylint: disable=import-outside-toplevel
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
  preprocess = ev.get("preprocess", AUTO)
  preprocess = ADM_PREPROCESS if preprocess in ("", AUTO) else preprocess
  if preprocess not in PREPROCESS:
    raise errors.ConfigError(
        f"config.evaluate.preprocess={preprocess!r}; use one of "
        f"{(AUTO,) + PREPROCESS}.")
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
    ref = load_reference(path)
    return json.dumps([int(ref.num_images or 0), describe(ref)])
  count, line = json.loads(multihost.string_on_process_0(summary))
  results = {"reference": path, "num_images": count,
             "preprocess": preprocess, "split": config.data.eval_split}
  return report.write(workdir, results, f"reference: {line}; use "
                      f"--config.evaluate.reference={path}")
