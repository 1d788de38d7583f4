"""The class labels a sampling run draws (``config.sample.classes`` /
``labels`` / ``seed``) and their placement on the devices."""

from __future__ import annotations

import jax
import numpy as np

from genvis_jax import errors


LABEL_DRAWS = ("balanced", "uniform")


def class_labels(num_samples: int, num_classes: int, classes=(),
                 draw: str = "balanced", seed: int = 0) -> np.ndarray:
  """The class label of each of ``num_samples`` images, (num_samples,) int32.

  ``draw`` (``config.sample.labels``): "balanced" cycles ``classes``
  (default all), e.g. 50 per class for 50k: RAR's ``list(range(1000)) * 50``.
  The Equivariant sampler's ``arange(1000).repeat(50)`` holds the same
  labels in another order (0, 0, ..., 1, 1, ...): the same set, so the same
  FID; cycled, each of the 5,000-image splits of ADM's Inception Score holds
  every class, not 100 of them; "uniform" draws
  each i.i.d. from them with NumPy's generator seeded by ``seed`` (the
  official FAR sampler's ``torch.randint(0, 1000, (n,))``: per-class counts
  about 50 +- 7). Either way the first k labels do not depend on
  ``num_samples``, so a resumed run that asks for more images keeps them.

  Raises:
    ConfigError: an entry that is not a whole number or a class outside
      0..num_classes - 1 (naming ``config.sample.classes``), or another
      ``draw``.
  """
  # --config.sample.classes= gives ('',), =cat ('cat',), =1.5 (1.5,).
  odd = [c for c in classes if isinstance(c, (bool, np.bool_))
         or not isinstance(c, (int, np.integer))]
  if odd:
    raise errors.ConfigError(
        f"config.sample.classes holds {odd[:5]}, not class numbers: give a "
        "tuple of whole numbers, e.g. --config.sample.classes='(207,360)', or "
        "--config.sample.classes='()' for all classes.")
  classes = np.asarray(list(classes) or range(num_classes), np.int64)
  bad = classes[(classes < 0) | (classes >= num_classes)]
  if bad.size:
    raise errors.ConfigError(
        f"config.sample.classes holds {sorted(set(bad.tolist()))[:5]}, not "
        f"classes of this model: use 0..{num_classes - 1} "
        f"(config.model.num_classes={num_classes}), or leave it empty for "
        "all classes.")
  if draw == "balanced":
    return np.resize(classes.astype(np.int32), num_samples)
  if draw == "uniform":
    picks = np.random.default_rng(seed).integers(0, len(classes), num_samples,
                                                 dtype=np.int64)
    return classes[picks].astype(np.int32)
  raise errors.ConfigError(
      f"config.sample.labels={draw!r}; use one of {LABEL_DRAWS} ('balanced': "
      "the same number of images per class; 'uniform': i.i.d. labels).")


def global_labels(labels: np.ndarray, sharding) -> jax.Array:
  """Host labels (B,), the same on every process -> a (B,) array sharded by
  ``sharding`` whose row i is ``labels[i]`` whatever the mesh's device order.

  Each device takes its rows by global index. (Feeding each process a
  contiguous slice would misplace rows where a process's devices are not one
  contiguous block of the mesh, e.g. a 1-D mesh that follows a TPU pod's
  physical rings: images would be saved under other rows' labels.)"""
  return jax.make_array_from_callback(labels.shape, sharding,
                                      lambda index: labels[index])


