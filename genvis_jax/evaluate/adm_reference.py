"""ADM reference batches: read and write the ``.npz`` format and decide
which Inception preprocessing a reference needs (``reference.py`` computes
our own).

Format of openai/guided-diffusion's reference batches (e.g.
``VIRTUAL_imagenet256_labeled.npz``):
  arr_0          uint8 (N, H, W, 3)   reference images; precision/recall use
                                      their Inception pool features
  mu, sigma      float64 (2048,), (2048, 2048)   pool statistics (FID)
  mu_s, sigma_s  float64 (2023,), (2023, 2023)   spatial statistics (sFID)
A file of mu and sigma alone (torch-fidelity's ``fid_statistics_file``,
pytorch-fid's ``.npz``; e.g. the Equivariant repository's
``fid_stats/adm_in256_stats.npz``) gives FID and IS only.
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

import numpy as np
from absl import logging
from etils import epath

from genvis_jax.core import multihost
from genvis_jax.errors import UserError
from genvis_jax.evaluate import npz

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
  def fid_only(self) -> bool:
    """Whether the file holds the pool statistics alone (mu, sigma)."""
    return self.mu is not None and self.mu_s is None

  @property
  def origin(self) -> str:
    """How the statistics were made, as far as the file tells:
      "recorded"  written here: ``preprocess`` (and weights, count) recorded;
      "adm"       ADM's layout (2048-d mu/sigma + 2023-d mu_s/sigma_s, the
                  sFID layer only ADM's evaluator reads) without our record:
                  made by ADM's TF graph (adm_tf);
      "images"    images only: statistics are computed here from them, with
                  the samples' own preprocessing (consistent by construction);
      "fid_stats" mu and sigma alone (``fid_only``), of no recorded making;
      "unknown"   statistics of no known making.
    """
    if self.preprocess is not None:
      return "recorded"
    if self.fid_only:
      return "fid_stats"
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
    if present and present not in (list(STAT_KEYS), ["mu", "sigma"]):
      raise npz.NpzContentError(
          f"{path} (config.evaluate.reference) has {present} but not all of "
          f"{STAT_KEYS}, nor mu and sigma alone (a pytorch-fid / "
          "torch-fidelity file: FID only): the file is damaged or not a "
          "reference. Use ADM's reference batch (e.g. "
          "VIRTUAL_imagenet256_labeled.npz) or one written by "
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
  if ref.mu is None and ref.images is None:
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
    if mu is None:   # a FID-only file
      continue
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
  if dims is None or ref.mu is None:
    return
  got = (ref.mu.shape[0], ref.mu_s.shape[0] if ref.has_stats else dims[1])
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
  unknown origin, and ``adm_tf`` with a logged note for a file of mu and sigma
  alone (torch-fidelity measures with TF1's resize, and the published
  statistics files come from TensorFlow's graph). An explicit value is used as given unless it contradicts a
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
  if origin == "fid_stats":
    chosen = ADM_PREPROCESS if requested == AUTO else requested
    logging.info(
        "%s holds mu and sigma alone (FID and IS only; no sFID, precision or "
        "recall) and no record of their making: measuring samples with "
        "preprocess %r (TF1's resize: torch-fidelity's and TensorFlow's "
        "graph's). For statistics made with pytorch-fid set %s=pytorch_fid.",
        ref.path, chosen, setting)
    return chosen
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
           len(ref.images) if ref.images is not None and ref.mu is None
           else "?")
  return (f"{ref.path}: origin {ref.origin}, statistics of {count} images, "
          f"{len(ref.images) if ref.images is not None else 0} stored images, "
          f"preprocess {ref.preprocess or '-'}, Inception weights "
          f"{ref.inception_weights or '-'}")
