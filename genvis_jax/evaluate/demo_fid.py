"""Demo-scale FID: the Fréchet distance of the demo classifier's features.

The real FID needs the 2015 Inception and thousands of 256 px images; the CPU
demo has neither. This is the same statistic on a feature network that fits the
demo: the small CNN of ``genvis_jax/models/classifier.py`` trained on the demo
data (task "classifier"), whose pooled ``features(images)`` (widths[-1]-d)
replace Inception's pool_3. Numbers are only comparable between runs that use
the same classifier checkpoint and similar sample counts.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.core import padded
from genvis_jax.core import pixels
from genvis_jax.evaluate import fid as fid_lib
from genvis_jax.evaluate import npz
from genvis_jax.evaluate import reference as ref_lib
from genvis_jax.evaluate import report


def _as_float01(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected (N, H, W, 3) images, got {images.shape}.")
  return pixels.as_unit(images)


@functools.partial(jax.jit, static_argnums=0)
def _features(model, params, x):
  """One program per classifier module (Linen modules hash by their fields)
  and batch shape, whichever call asks for it."""
  return model.apply({"params": params}, x, method="features")


def classifier_features(images, classifier_params, classifier_config,
                        batch_size: int = 256) -> np.ndarray:
  """uint8 (or [0, 1] float) (N, H, W, 3) -> (N, widths[-1]) float32.

  Batches of ``batch_size`` (the last one zero-padded: one compiled shape, the
  padding's rows dropped), so exactly N rows come back for any batch size.
  Raises ``ValueError`` for images that are not (N, H, W, 3) or N = 0."""
  model = models.build(classifier_config)
  x = _as_float01(images)
  return padded.map_padded(functools.partial(_features, model),
                           classifier_params, x, min(batch_size, len(x)))


def demo_fid(samples_uint8, reference_images, classifier_params,
             classifier_config, batch_size: int = 256) -> float:
  """Fréchet distance between classifier features of samples and references.

  Args:
    samples_uint8: (N, H, W, 3) uint8 samples.
    reference_images: (M, H, W, 3) real images, uint8 or float in [0, 1].
    classifier_params, classifier_config: the trained demo classifier
      (``config.model`` of its stage, name "classifier").
  Returns:
    float >= 0 (0 for identical sets).
  Raises:
    ValueError: N < 2 or M < 2, images that are not (., H, W, 3).
  """
  if len(samples_uint8) < 2 or len(reference_images) < 2:
    raise ValueError("demo_fid needs at least 2 samples and 2 reference images.")
  params = jax.device_put(classifier_params)   # once for both sets
  a = classifier_features(samples_uint8, params, classifier_config, batch_size)
  b = classifier_features(reference_images, params, classifier_config,
                          batch_size)
  return fid_lib.frechet_distance(*fid_lib.feature_stats(a),
                                  *fid_lib.feature_stats(b))


def check_config(config, workdir: str | None = None) -> None:
  """Refuses a negative ``config.evaluate.num_reference`` before any file
  is read (a runner of several jobs checks each first)."""
  del workdir
  if config.evaluate.get("num_reference", 0) < 0:
    raise errors.ConfigError(
        f"config.evaluate.num_reference={config.evaluate.num_reference} must "
        "be >= 0 (0 = as many as the samples).")


def evaluate(config, workdir: str) -> dict:
  """``config.evaluate.kind == "demo_fid"``: samples (npz ``arr_0``),
  classifier_checkpoint; the reference is exactly ``num_reference`` images
  (default: as many as samples; more than the split holds is an error,
  ``batching.NotEnoughImages``) of ``config.data.eval_split``;
  ``config.model`` is the classifier's. Returns (and writes to
  ``workdir/metrics.json``) {"demo_fid", "num_samples", "num_reference"}."""
  ev = config.evaluate
  samples = npz.load_samples(ev.samples)["arr_0"]
  params = models.load_params(
      config.model, ev.classifier_checkpoint,
      setting="--config.evaluate.classifier_checkpoint")
  num_ref = ev.get("num_reference", 0) or len(samples)
  batch_size = ev.get("batch_size", 200)   # configs/base.py's
  _, batches = ref_lib.dataset_images(config.data, config.data.eval_split,
                                      batch_size, num_ref,
                                      "config.evaluate.num_reference")
  reference = np.concatenate(list(batches))
  value = demo_fid(samples, reference, params, config.model, batch_size)
  result = {"demo_fid": value, "num_samples": int(len(samples)),
            "num_reference": int(len(reference))}
  msg = (f"demo FID (classifier features) {value:.3f} of {len(samples)} samples "
         f"vs {len(reference)} real images")
  return report.write(workdir, result, msg)
