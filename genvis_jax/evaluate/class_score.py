"""Conditioning accuracy: how often a classifier recognises the class each
sample was conditioned on (the demo's quality number; chance = 1 / classes)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from genvis_jax import models
from genvis_jax.core import padded
from genvis_jax.core import pixels
from genvis_jax.evaluate import npz
from genvis_jax.evaluate import report


@functools.partial(jax.jit, static_argnums=0)
def _predict(classifier, params, x):
  """Predicted classes (B,); one program per classifier module and shape."""
  return classifier.apply({"params": params}, x).argmax(-1)


def conditioning_accuracy(classifier, params, images_uint8, labels,
                          batch_size: int = 256) -> float:
  """Fraction in [0, 1] of ``images_uint8`` (N, H, W, 3) classified as
  ``labels`` (N,) int.

  Batches of ``batch_size``; the last one is zero-padded (one compiled shape)
  and its padding is masked out, so every one of the N images counts once.
  Raises ``ValueError`` for no labels or a label count other than N."""
  labels = np.asarray(labels)
  if len(labels) != len(images_uint8) or not len(labels):
    raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels: "
                     "the samples file must hold one label per image.")
  pred = padded.map_padded(
      functools.partial(_predict, classifier), params, images_uint8,
      min(batch_size, len(labels)), prepare=pixels.as_unit)
  return int(np.sum(pred == labels)) / len(labels)


def evaluate(config, workdir: str) -> dict:
  """``config.evaluate``: samples (npz), classifier_checkpoint, min_accuracy.

  Returns (and writes to ``workdir/metrics.json``) {"conditioning_accuracy",
  "chance", "num_samples"}. Raises ``RuntimeError`` when the accuracy is
  below ``min_accuracy``, and the npz / checkpoint errors of the loads."""
  ev = config.evaluate
  d = npz.load_samples(ev.samples)
  # Ours write "labels"; ADM's labelled batches "arr_1".
  label_key = next((k for k in ("labels", "arr_1") if k in d), None)
  if label_key is None:
    raise npz.NpzContentError(
        f"{ev.samples} (config.evaluate.samples) holds no class labels "
        f"('labels' or 'arr_1'; it has {sorted(d)}): the conditioning "
        "accuracy needs the class each image was drawn for. Use a samples.npz "
        "written by --config.mode=sample.")
  images, labels = d["arr_0"], d[label_key]
  classifier = models.build(config.model)
  params = models.load_params(
      config.model, ev.classifier_checkpoint,
      setting="--config.evaluate.classifier_checkpoint")
  acc = conditioning_accuracy(classifier, params, images, labels)
  chance = 1.0 / config.model.num_classes
  result = {"conditioning_accuracy": acc, "chance": chance,
            "num_samples": int(len(images))}
  msg = (f"classifier recognises the conditioning class of {100 * acc:.1f}% of "
         f"{len(images)} samples (chance {100 * chance:.1f}%)")
  report.write(workdir, result, msg)
  if acc < ev.get("min_accuracy", 0.0):
    raise RuntimeError(f"Sample quality check failed: {msg}, below the required "
                       f"{100 * ev.min_accuracy:.0f}%.")
  return result
