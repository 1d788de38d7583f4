"""FID / sFID, Inception Score and k-NN precision/recall, as the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) computes them.

* Fréchet distance in float64 with ``scipy.linalg.sqrtm`` (eps 1e-6 on the
  diagonals only if the product is singular; tiny imaginary parts dropped).
* Feature statistics accumulated in float64, streaming (no feature matrix kept).
* IS over consecutive chunks of ``split_size`` = 5000 samples (10 splits for
  50,000 samples), mean of exp(E[KL(p(y|x) || p(y))]).
* Precision / recall (Kynkäänniemi et al. 2019) with k = 3: a point's radius is
  the squared distance to its k-th nearest neighbour in its own set (itself
  counting as the 0-th); precision = fraction of samples inside some reference
  ball, recall = fraction of references inside some sample ball. Pairwise
  squared distances run in JAX in fixed-size blocks whose rows are split over
  the devices of a 1-D mesh; like ADM they use float16 inputs/outputs by default
  (float32 when a block overflows).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from genvis_jax.core import padded
from genvis_jax.errors import ConfigError
from genvis_jax.core import sharding


# --- Fréchet distance --------------------------------------------------------------

# Inception's pool features: below this many images their covariance is
# rank-deficient, and FID is not comparable with published numbers.
FEATURE_DIM = 2048

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     name: str = "FID") -> float:
  """max(0, ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))) in float64.

  The formula is ADM's / pytorch-fid's; rounding in ``sqrtm`` can make it
  slightly negative (-2e-13) for (near-)identical statistics, and a distance
  is never negative, so it is clamped at 0 (FID and sFID alike). ``name``
  (e.g. "sFID") starts the warnings about singular covariances.
  mu1, mu2: (D,); sigma1, sigma2: (D, D) (any float dtype; scalars for
  D = 1). Returns a Python float >= 0.

  Raises:
    ValueError: statistics of different sizes or with NaN / Inf entries
      (``max(0, nan)`` would report a perfect 0), or a square root with a
      non-negligible imaginary diagonal (ill-conditioned statistics).
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  s1, s2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"Statistics of different sizes: mu {mu1.shape} vs "
                     f"{mu2.shape}, sigma {s1.shape} vs {s2.shape}. Both sides "
                     "must come from the same feature layer.")
  for side, arrays in (("first", (mu1, s1)), ("second", (mu2, s2))):
    bad = [n for n, a in zip(("mean", "covariance"), arrays)
           if not np.isfinite(a).all()]
    if bad:
      raise ValueError(f"{name}: the {side} statistics' {' and '.join(bad)} "
                       "hold NaN or Inf; no distance can be computed from "
                       "them.")
  diff = mu1 - mu2
  with warnings.catch_warnings(record=True) as scipy_warnings:
    # scipy's own warning prints its source line; said here in FID's words.
    warnings.simplefilter("always", linalg.LinAlgWarning)
    covmean = linalg.sqrtm(s1.dot(s2))
    finite = np.isfinite(covmean).all()
    if not finite:
      offset = np.eye(s1.shape[0]) * eps
      covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  for w in scipy_warnings:   # any other warning, as it came
    if not issubclass(w.category, linalg.LinAlgWarning):
      warnings.warn(w.message, w.category)
  if not finite:
    warnings.warn(f"{name}: singular product; adding {eps} to the covariance "
                  "diagonals.")
  elif any(issubclass(w.category, linalg.LinAlgWarning)
           for w in scipy_warnings):
    warnings.warn(f"{name}: the covariance product is singular (fewer images "
                  "than feature dimensions?); its square root may be "
                  "inaccurate.")
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag))}; the statistics are "
                       "ill-conditioned (too few samples for the dimension?).")
    covmean = covmean.real
  return max(0.0, float(diff.dot(diff) + np.trace(s1) + np.trace(s2)
                        - 2.0 * np.trace(covmean)))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) -> mean (D,), covariance (D, D) (N - 1 normalised), float64.
  Raises ``ValueError`` unless features are 2-D with N >= 2."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"Need (N >= 2, D) features, got shape {f.shape}.")
  return f.mean(0), np.cov(f, rowvar=False)


class StreamingStats:
  """Mean and covariance of features seen batch by batch, in float64.

  Sums are taken around a shift (the first batch's mean) so the covariance
  does not suffer from cancellation when the mean is large.
  """

  def __init__(self):
    self.count = 0
    self._shift = self._sum = self._outer = None

  def update(self, features, mask=None) -> None:
    """Adds (B, D) ``features``; ``mask`` (B,) bool keeps only its True rows
    (the padding of a fixed-size last batch stays out of the statistics).
    Raises ``ValueError`` for features that are not 2-D, a mask of another
    shape, or a D that differs from earlier batches."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise ValueError(f"features must be (B, D), got {f.shape}.")
    if mask is not None:
      mask = np.asarray(mask, bool)
      if mask.shape != f.shape[:1]:
        raise ValueError(f"mask must be ({len(f)},), got {mask.shape}.")
      f = f[mask]
    if not len(f):
      return
    if self._shift is None:
      self._shift = f.mean(0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((f.shape[1],) * 2)
    elif f.shape[1] != self._shift.shape[0]:
      raise ValueError(f"Feature size changed: {f.shape[1]} vs "
                       f"{self._shift.shape[0]}.")
    c = f - self._shift
    self._sum += c.sum(0)
    self._outer += c.T @ c
    self.count += len(f)

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64, like ``np.mean`` /
    ``np.cov(rowvar=False)``. Raises ``ValueError`` below 2 rows."""
    if self.count < 2:
      raise ValueError(f"Need at least 2 feature vectors, got {self.count}.")
    m = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(m, m)) / (self.count - 1)
    return self._shift + m, sigma


# --- Inception Score -------------------------------------------------------------

# ADM's evaluator: compute_inception_score(activations, split_size=5000).
ADM_IS_SPLIT_SIZE = 5000


def inception_score(logits: np.ndarray,
                    split_size: int = ADM_IS_SPLIT_SIZE) -> float:
  """ADM's IS from (N, C) logits: mean over consecutive ``split_size`` chunks of
  exp(mean_i KL(p_i || mean_j p_j)), computed in float64; a Python float in
  [1, C]. Raises ``ValueError`` unless logits are (N > 0, C)."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not len(logits):
    raise ValueError(f"logits must be (N > 0, C), got {logits.shape}.")
  score = StreamingInceptionScore(split_size)
  score.update(logits)
  return score.result()


def inception_score_shuffled(logits: np.ndarray, splits: int = 10,
                             seed: int = 2020) -> float:
  """torch-fidelity's IS (``isc_features_to_metric`` at its defaults, the
  Equivariant repository's metric): the (N, C) logits' rows permuted by
  ``np.random.RandomState(seed).permutation(N)``, cut into ``splits`` chunks
  ``[i N // splits, (i + 1) N // splits)``, each exp(mean_i KL(p_i ||
  mean_j p_j)) in float64, averaged: a Python float in [1, C]. ADM's
  (``inception_score``) takes consecutive 5,000-image chunks unshuffled.
  Raises ``ValueError`` unless logits are (N >= splits, C)."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < max(int(splits), 1):
    raise ValueError(f"logits must be (N >= {splits}, C), got {logits.shape}.")
  n = len(logits)
  logits = logits[np.random.RandomState(seed).permutation(n)]
  scores = []
  for i in range(splits):
    score = StreamingInceptionScore(0)   # one split: the chunk
    score.update(logits[i * n // splits:(i + 1) * n // splits])
    scores.append(score.result())
  return float(np.mean(scores))


# config.evaluate.inception_score -> how IS is computed from the logits.
IS_PROTOCOLS = ("adm", "torch_fidelity")


class StreamingInceptionScore:
  """``inception_score`` of logits seen batch by batch (nothing of size N
  kept): exp of the mean KL(p_i || mean_j p_j) over consecutive splits of
  ``split_size`` images, averaged over the splits (0: one split of all the
  images, 1d-tokenizer's evaluator). Sums in float64; ``eps`` is added to
  the probabilities inside both logs (1d-tokenizer: 1e-16; 0 takes the
  exact log-softmax, as ADM's)."""

  def __init__(self, split_size: int = ADM_IS_SPLIT_SIZE, eps: float = 0.0):
    if int(split_size) < 0:   # no split would ever fill: update looped forever
      raise ValueError(f"split_size must be >= 0 (0: one split of all the "
                       f"images), got {split_size}.")
    self.split_size, self.eps = int(split_size), float(eps)
    self.scores: list[float] = []
    self._reset()

  def _reset(self):
    self._n, self._p = 0, None
    self._plogp = None

  def update(self, logits) -> None:
    """Adds (B, C) logits (in order). Raises ``ValueError`` unless 2-D."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
      raise ValueError(f"logits must be (B, C), got {logits.shape}.")
    while len(logits):
      room = (self.split_size - self._n) if self.split_size else len(logits)
      part, logits = logits[:room], logits[room:]
      logp = part - part.max(1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(1, keepdims=True))
      p = np.exp(logp)
      if self.eps:
        logp = np.log(p + self.eps)
      if self._p is None:
        self._p, self._plogp = np.zeros(p.shape[1]), np.zeros(p.shape[1])
      self._p += p.sum(0)
      self._plogp += (p * logp).sum(0)
      self._n += len(part)
      if self.split_size and self._n == self.split_size:
        self._close()

  def _split_score(self) -> float:
    """The score of the split being filled, from its sums."""
    log_mean = np.log(self._p / self._n + self.eps)
    return float(np.exp(
        (self._plogp.sum() - (self._p * log_mean).sum()) / self._n))

  def _close(self):
    self.scores.append(self._split_score())
    self._reset()

  def result(self) -> float:
    """The score, a float in [1, C], of everything added so far (the last,
    partial split included). Raises ``ValueError`` with nothing added."""
    scores = self.scores + ([self._split_score()] if self._n else [])
    if not scores:
      raise ValueError("No logits were added.")
    return float(np.mean(scores))


# --- k-NN precision / recall -------------------------------------------------------

def _sq_dists(u, v, dtype):
  """(n, D), (m, D) -> (n, m) float32 squared distances, max(., 0).

  float16: inputs rounded to half, the norms, products and their sum in
  float32, the result rounded to half. ADM's TF graph rounds each of those
  steps to half too; emulated op by op on Inception-like features (5k
  points), precision / recall differ from it by at most ~1.4e-3, below the
  two decimals papers report (and from exact distances by as much)."""
  u, v = u.astype(dtype), v.astype(dtype)
  hp = jax.lax.Precision.HIGHEST
  nu = jnp.sum(jnp.square(u.astype(jnp.float32)), 1)[:, None]
  nv = jnp.sum(jnp.square(v.astype(jnp.float32)), 1)[None, :]
  uv = jnp.dot(u, v.T, precision=hp, preferred_element_type=jnp.float32)
  d = jnp.maximum(nu - 2.0 * uv + nv, 0.0)
  return d.astype(dtype).astype(jnp.float32)


def _with_fallback(u, v, dtype):
  d = _sq_dists(u, v, dtype)
  if dtype == jnp.float32:
    return d
  return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d,
                      lambda: _sq_dists(u, v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _knn_block(rows, cols, col_valid, best, *, k, dtype):
  """Merges one column block into the running k+1 smallest distances per row."""
  d = _with_fallback(rows, cols, dtype)
  d = jnp.where(col_valid[None, :], d, jnp.inf)
  cand = jnp.concatenate([best, d], axis=1)
  return -jax.lax.top_k(-cand, k + 1)[0]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _inside_block(rows, row_radii, cols, col_radii, col_valid, row_valid, *,
                  dtype):
  """rows inside some col ball (n,), cols inside some row ball (m,)."""
  d = _with_fallback(rows, cols, dtype)
  rows_in = jnp.any((d <= col_radii[None, :]) & col_valid[None, :], axis=1)
  cols_in = jnp.any((d <= row_radii[:, None]) & row_valid[:, None], axis=0)
  return rows_in, cols_in


def _blocks(x: np.ndarray, size: int):
  """Yields (start, zero-padded (size, D) block, valid mask (size,))."""
  for start in range(0, len(x), size):
    yield start, *padded.pad_batch(x[start:start + size], size)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class _Blocks:
  """Block sizes and shardings shared by the radii and the ball tests."""

  def __init__(self, n_rows, n_cols, row_block, col_block, mesh):
    self.mesh = mesh or sharding.data_mesh(jax.local_devices())
    shards = self.mesh.shape["data"]
    self.rows = _round_up(min(row_block, _round_up(n_rows, shards)), shards)
    self.cols = min(col_block, n_cols)
    self.row_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)

  def put_rows(self, x):
    return jax.device_put(x, self.row_sharding)

  def put_cols(self, x):
    return jax.device_put(x, self.replicated)


DISTANCE_DTYPES = ("float16", "float32")


def check_distance_dtype(name: str) -> np.dtype:
  """The dtype of precision / recall distances ``name`` (one of
  ``DISTANCE_DTYPES``); ``ConfigError`` naming config.evaluate.distance_dtype
  otherwise (another dtype gave other numbers without a word)."""
  if name not in DISTANCE_DTYPES:
    raise ConfigError(f"config.evaluate.distance_dtype={name!r} is not one of "
                      f"{DISTANCE_DTYPES} (float16: ADM's evaluator).")
  return jnp.dtype(name)


def manifold_radii(features: np.ndarray, k: int = 3, *, row_block: int = 10000,
                   col_block: int = 10000, distance_dtype: str = "float16",
                   mesh=None) -> np.ndarray:
  """Squared distance of each point to its k-th nearest other point: the
  radius of its ball in ADM's ``ManifoldEstimator`` (itself at distance 0
  is the 0-th neighbour).

  Args:
    features: (N, D) float array, N > k (e.g. Inception pool features).
    k: the neighbour whose distance is the radius (ADM: 3).
    row_block, col_block: rows / columns of one (rows, cols) distance block;
      rows are split over the ``data`` axis of ``mesh`` (default: a data mesh
      of the local devices), columns are replicated.
    distance_dtype: "float16" (as ADM's GPU graph: inputs and distances
      rounded to half; the norms and products in float32, where ADM rounds
      each step to half, see ``_sq_dists``) or "float32"; float16 blocks
      that overflow are recomputed in float32.
  Returns:
    (N,) float32 squared distances.
  Raises:
    ValueError: N <= k.
    ConfigError: ``distance_dtype`` not one of ``DISTANCE_DTYPES``.
  """
  x = np.asarray(features, np.float32)
  if len(x) <= k:
    raise ValueError(f"Need more than k={k} feature vectors, got {len(x)}.")
  dtype = check_distance_dtype(distance_dtype)
  b = _Blocks(len(x), len(x), row_block, col_block, mesh)
  radii = np.zeros(len(x), np.float32)
  for r0, rows, _ in _blocks(x, b.rows):
    rows_d = b.put_rows(rows)
    best = b.put_rows(np.full((b.rows, k + 1), np.inf, np.float32))
    for _, cols, valid in _blocks(x, b.cols):
      best = _knn_block(rows_d, b.put_cols(cols), b.put_cols(valid), best,
                        k=k, dtype=dtype)
    n = min(b.rows, len(x) - r0)
    radii[r0:r0 + n] = np.asarray(best)[:n, k]
  return radii


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = 3, *, row_block: int = 10000,
                     col_block: int = 10000, distance_dtype: str = "float16",
                     mesh=None) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's
  ``evaluator.py`` computes them (``compute_prec_recall``): precision = the
  fraction of samples inside the k-NN ball of some reference, recall = the
  fraction of references inside the ball of some sample (a point on the
  radius counts as inside).

  Args:
    ref_features, sample_features: (N_ref, D), (N_sample, D) float arrays
      (Inception pool features), each N > k.
    k, row_block, col_block, distance_dtype, mesh: as ``manifold_radii``.
  Returns:
    (precision, recall), floats in [0, 1].
  Raises:
    ValueError: not two (N, D) matrices of one D, or N <= k.
    ConfigError: ``distance_dtype`` not one of ``DISTANCE_DTYPES``.
  """
  dtype = check_distance_dtype(distance_dtype)   # before any distance
  ref = np.asarray(ref_features, np.float32)
  sam = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
    raise ValueError(f"Feature matrices must be (N, D) with one D, got "
                     f"{ref.shape} and {sam.shape}.")
  kw = dict(row_block=row_block, col_block=col_block,
            distance_dtype=distance_dtype, mesh=mesh)
  ref_r = manifold_radii(ref, k, **kw)
  sam_r = manifold_radii(sam, k, **kw)
  b = _Blocks(len(sam), len(ref), row_block, col_block, mesh)
  sam_in = np.zeros(len(sam), bool)   # inside a reference ball: precision
  ref_in = np.zeros(len(ref), bool)   # inside a sample ball: recall
  pad = lambda r, n: padded.pad_batch(r, n)[0]
  for s0, rows, rvalid in _blocks(sam, b.rows):
    rows_d = b.put_rows(rows)
    rrad = b.put_rows(pad(sam_r[s0:s0 + b.rows], b.rows))
    rval = b.put_rows(rvalid)
    n = int(rvalid.sum())
    for c0, cols, cvalid in _blocks(ref, b.cols):
      m = int(cvalid.sum())
      r_in, c_in = _inside_block(
          rows_d, rrad, b.put_cols(cols),
          b.put_cols(pad(ref_r[c0:c0 + b.cols], b.cols)), b.put_cols(cvalid),
          rval, dtype=dtype)
      sam_in[s0:s0 + n] |= np.asarray(r_in)[:n]
      ref_in[c0:c0 + m] |= np.asarray(c_in)[:m]
  return float(sam_in.mean()), float(ref_in.mean())
