"""Reference formulas and stand-ins shared by the evaluation tests: the
textbook Frechet distance, NumPy Inception Score and precision / recall,
skimage's SSIM, a cheap feature network."""

import jax
import numpy as np
from scipy import linalg

from genvis_jax.core import sharding


def inception_score(logits, split_size):
  """The Inception Score as the ADM evaluator computes it (NumPy, per split
  of ``split_size`` rows): exp(mean KL(p(y|x) || p(y)))."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(p), split_size):
    part = p[i:i + split_size]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return np.mean(scores)


def tokenizer_inception_score(logits, eps=1e-16):
  """1d-tokenizer's evaluator (``evaluator/evaluator.py``): one split of
  all images, float32 softmax, float64 sums of p and p log(p + eps), then
  exp((sum p log p - sum_c P_c log(P_c / N + eps)) / N)."""
  p = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float32)
  p /= p.sum(1, keepdims=True)
  total = p.sum(0, dtype=np.float64)
  kl = (p * np.log(p + np.float32(eps))).sum(0, dtype=np.float64)
  return float(np.exp(np.sum(kl - total * np.log(total / len(p) + eps))
                      / len(p)))


def codebook_entropy(codes, num_codes):
  """1d-tokenizer's ``CodebookEntropy``: -sum p log2(p + 1e-8) of the code
  frequencies (index_add of counts into a codebook-sized vector)."""
  freq = np.zeros(num_codes, np.float64)
  entries, counts = np.unique(codes, return_counts=True)
  np.add.at(freq, entries, counts)
  probs = freq / freq.sum()
  return float((-np.log2(probs + 1e-8) * probs).sum())


def precision_recall(ref, sam, k=3):
  """Improved precision / recall (Kynkaanniemi et al. 2019) in float64 NumPy:
  ``(precision, recall, ref_radii)``; the radii are squared distances to
  the k-th nearest other point, as in ADM's ``ManifoldEstimator``."""
  def d2(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1), 0)
  ref_r = np.sort(d2(ref, ref), 1)[:, k]
  sam_r = np.sort(d2(sam, sam), 1)[:, k]
  d = d2(sam, ref)
  return (d <= ref_r[None]).any(1).mean(), (d <= sam_r[:, None]).any(0).mean(), ref_r


class FakeExtractor:
  """Stands in for the Inception: fixed random projections of 4x4 pooled
  pixels (pool 10-d, spatial 6-d, logits 5-d), split over a device mesh."""
  feature_dims = (10, 6)

  def __init__(self, batch_size=6):
    self.batch_size = batch_size
    self.mesh = sharding.data_mesh(jax.devices()[:2])
    rng = np.random.default_rng(0)
    self.w = {k: rng.normal(size=(48, d)) for k, d in
              (("pool", 10), ("spatial", 6), ("logits", 5))}
    self.calls = 0

  def __call__(self, images):
    assert images.dtype == np.uint8 and len(images) <= self.batch_size
    self.calls += 1
    b, h, w, _ = images.shape
    x = images.astype(np.float64).reshape(b, 4, h // 4, 4, w // 4, 3)
    x = x.mean((2, 4)).reshape(b, -1) / 255.0
    return {k: (x @ v).astype(np.float32) for k, v in self.w.items()}


def images(rng, n, shift=0):
  """n random uint8 (8, 8, 3) images, brightened by ``shift``."""
  base = rng.integers(0, 200, (n, 8, 8, 3))
  return np.clip(base + shift, 0, 255).astype(np.uint8)


def frechet_formula(mu1, s1, mu2, s2):
  """The textbook formula, unclamped (scipy sqrtm, float64)."""
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


def feature_stats(f):
  """(N, D) features -> float64 mean (D,) and covariance (D, D), NumPy."""
  f = np.asarray(f, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def ssim(x, y, **recipe):
  """skimage's ``structural_similarity`` per image (x, y in [0, 1]); the
  default recipe is our ``ssim``'s (Gaussian sigma 1.5, population
  covariance, data range 1), ``recipe`` overrides it."""
  from skimage.metrics import structural_similarity
  kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False)
  kw.update(recipe)
  return np.array([structural_similarity(a, b, channel_axis=-1, **kw)
                   for a, b in zip(x.astype(np.float64), y.astype(np.float64))])


def random_stats(rng, d, n=None):
  """(mu (d,), sigma (d, d)) of n (default 3d) correlated normal features."""
  n = n or 3 * d
  a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  return a.mean(0) + rng.normal(size=d), np.cov(a, rowvar=False)
