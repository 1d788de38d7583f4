"""Reconstruction metrics of tokenizer evaluation: PSNR, SSIM (both
recipes the official code bases use) and codebook usage / entropy, on
batches of images or codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genvis_jax.core import pixels


def psnr(x: np.ndarray, y: np.ndarray, value_range=(0.0, 1.0)) -> np.ndarray:
  """Per-image PSNR in dB of images in ``value_range``, computed in float64
  (skimage's ``peak_signal_noise_ratio``); (B, ...) pair -> (B,) float64, at
  most 120 dB (the MSE is floored at 1e-12)."""
  scale = float(value_range[1]) - float(value_range[0])
  d = (np.asarray(x, np.float64) - np.asarray(y, np.float64)) / scale
  return mse_and_psnr(np.square(d))[1]


def mse_and_psnr(sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-image MSE and PSNR of images in [0, 1], from their elementwise
  squared error ``sq`` (B, ...) (float64, so a caller summing it for its own
  MSE shares it): ((B,) MSE, (B,) PSNR in dB, ``10 log10(1 / mse)`` with the
  MSE floored at 1e-12, so at most 120 dB)."""
  mse = np.mean(sq, axis=tuple(range(1, sq.ndim)))
  return mse, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def ssim(x, y, value_range=(0.0, 1.0), *, window: int = 11,
         gaussian: bool = True, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, sample_covariance: bool = False,
         data_range: float = 1.0) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004), (B, H, W, C) pair -> (B,).

  Images are first mapped from ``value_range`` to [0, 1]; ``data_range`` is
  the L of the constants (k1 L)^2, (k2 L)^2 for those [0, 1] images (so
  skimage's ``data_range`` on [0, 1] images, whatever ``value_range`` is).
  The defaults, a Gaussian ``window`` x ``window`` window (sigma 1.5), "valid"
  filtering (no padded borders), L = 1, mean over positions and channels,
  are tf.image.ssim and skimage's ``structural_similarity(..., data_range=1,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
  ``gaussian=False`` takes the plain mean over the window and
  ``sample_covariance`` scales the (co)variances by N / (N - 1), N =
  window^2: with ``window=7`` these are skimage's defaults, which LlamaGen's
  evaluation calls with ``data_range=2.0`` on [0, 1] images.
  Returns float32 (B,). Raises ``ValueError`` for inputs that are
  not (B, H, W, C) of one shape, or images smaller than ``window``.
  """
  # SSIM's luminance term is not shift-invariant: measure on [0, 1] images
  # whatever the model's range, so (0, 1) and (-1, 1) tokenizers compare.
  x = pixels.to_unit(jnp.asarray(x, jnp.float32), value_range)
  y = pixels.to_unit(jnp.asarray(y, jnp.float32), value_range)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"SSIM needs two (B, H, W, C) batches of one shape, got "
                     f"{x.shape} and {y.shape}.")
  if min(x.shape[1:3]) < window:
    raise ValueError(f"SSIM window {window} is larger than the images "
                     f"{x.shape[1:3]}; use a smaller window.")
  h, w = x.shape[1:3]
  g = jnp.asarray(_gaussian_window(window, sigma) if gaussian
                  else np.full(window, 1.0 / window, np.float32))
  hp = jax.lax.Precision.HIGHEST

  def blur(v):   # separable valid filtering along H then W
    v = jnp.stack([v[:, i:h - window + 1 + i] for i in range(window)], 0)
    v = jnp.einsum("k,kbhwc->bhwc", g, v, precision=hp)
    v = jnp.stack([v[:, :, i:w - window + 1 + i] for i in range(window)], 0)
    return jnp.einsum("k,kbhwc->bhwc", g, v, precision=hp)

  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  n = window * window
  cov_norm = n / (n - 1) if sample_covariance else 1.0
  mx, my = blur(x), blur(y)
  sxx = cov_norm * (blur(x * x) - mx * mx)
  syy = cov_norm * (blur(y * y) - my * my)
  sxy = cov_norm * (blur(x * y) - mx * my)
  num = (2 * mx * my + c1) * (2 * sxy + c2)
  den = (mx * mx + my * my + c1) * (sxx + syy + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def code_counts(codes) -> list[np.ndarray]:
  """How often each code occurs: one int64 ``np.bincount`` per code map of
  ``codes`` (an int array, or a tuple of them for factorized tokenizers)."""
  maps = list(codes) if isinstance(codes, (tuple, list)) else [codes]
  return [np.bincount(np.asarray(m).ravel()).astype(np.int64) for m in maps]


def add_counts(a: list[np.ndarray] | None, b: list[np.ndarray]):
  """Elementwise sum of two ``code_counts`` results (None: nothing yet)."""
  if a is None:
    return b
  out = []
  for x, y in zip(a, b):
    n = max(len(x), len(y))
    out.append(np.pad(x, (0, n - len(x))) + np.pad(y, (0, n - len(y))))
  return out


def codebook_usage(codes, num_codes) -> dict:
  """Fraction of codebook entries used by ``codes`` and the entropy of
  their frequencies.

  ``codes``: an int array, or a tuple of k int arrays (factorized tokenizers,
  one map per sub-codebook). ``num_codes``: int or one per sub-codebook.
  Returns ``codebook_stats`` of their ``code_counts``."""
  return codebook_stats(code_counts(codes), num_codes,
                        factorized=isinstance(codes, (tuple, list)))


def codebook_stats(counts: list[np.ndarray], num_codes, *,
                   factorized: bool) -> dict:
  """{"codebook_usage", "codes_used", "codebook_entropy"} of per-map code
  ``counts`` (``code_counts``) and, ``factorized``, "codebook_usage_{i}" /
  "codes_used_{i}" / "codebook_entropy_{i}" per sub-codebook (the overall
  usage and entropy are then their means). Usage: distinct codes over the
  images / codebook size, a float in [0, 1] (1d-tokenizer's
  ``CodebookUsage``; LlamaGen / FQGAN publish a training-time window of the
  last 65,536 codes instead). Entropy: ``-sum(p log2(p + 1e-8))`` of the
  code frequencies, in bits (1d-tokenizer's ``CodebookEntropy``; at most
  log2 of the codebook size). Raises ``ValueError`` when the number of code
  maps and of codebook sizes differ."""
  sizes = (list(num_codes) if isinstance(num_codes, (tuple, list))
           else [num_codes] * len(counts))
  if len(sizes) != len(counts):
    raise ValueError(f"{len(counts)} code maps but {len(sizes)} codebook sizes.")
  used = [int(np.count_nonzero(c)) for c in counts]
  entropy = []
  for c in counts:
    prob = c / max(int(c.sum()), 1)
    entropy.append(float(-np.sum(np.log2(prob + 1e-8) * prob)))
  out = {"codebook_usage": float(np.mean([u / n for u, n in zip(used, sizes)])),
         "codes_used": int(sum(used)),
         "codebook_entropy": float(np.mean(entropy))}
  if factorized:
    for i, (u, n) in enumerate(zip(used, sizes)):
      out[f"codebook_usage_{i}"] = u / n
      out[f"codes_used_{i}"] = u
      out[f"codebook_entropy_{i}"] = entropy[i]
  return out
