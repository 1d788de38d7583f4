"""Vector quantizer (VQ-VAE style) shared by the MaskGIT, LlamaGen and FQGAN tokenizers.

One codebook of ``num_codes`` vectors of width ``code_dim``; latents are snapped to
their nearest code in squared L2 distance and gradients pass straight through to
the encoder. A factorized quantizer (FQGAN) stacks several of these, one per
sub-codebook, so nothing here assumes a particular tokenizer.

Losses (all means over every latent element, computed in float32):
  codebook_loss   = mean((z_q - sg[z])^2)      moves codes toward latents
  commitment_loss = mean((sg[z_q] - z)^2)      keeps latents near their code
  entropy_loss    = H(p(code | z)) per sample - H(mean p(code))   (LlamaGen form)
  quantizer_loss  = codebook + beta * commitment + entropy_weight * entropy

Note: the MaskGIT VQGAN code (1d-tokenizer) puts ``beta`` on the codebook term and
weight 1 on the commitment term; the total's value is identical, only the split of
gradients differs. We use the standard VQ-VAE / LlamaGen weighting.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import errors
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along ``axis``, as ``torch.nn.functional.normalize``;
  shape and dtype kept."""
  # max inside the sqrt: same value, finite gradient at x = 0.
  ss = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(ss, eps * eps))


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """||z - e||^2 for every (latent, code) pair in float32.

  z: (N, D); codebook: (K, D) -> (N, K). HIGHEST precision so TPU/GPU matmuls do
  not silently drop to bf16/tf32 passes (code choice must match the checkpoint).
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  zz = jnp.sum(jnp.square(z), axis=1, keepdims=True)
  ee = jnp.sum(jnp.square(codebook), axis=1)[None, :]
  ze = jnp.matmul(z, codebook.T, precision=_HIGHEST)
  return zz + ee - 2.0 * ze


def entropy_loss(affinity: jax.Array, temperature: float = 0.01,
                 groups: int = 1) -> jax.Array:
  """Per-sample entropy minus entropy of the mean code distribution.

  affinity: (..., K) logits (negative distances), float32 scalar out. Low when
  every latent picks one code confidently while the batch as a whole spreads
  over the codebook. Matches LlamaGen's ``compute_entropy_loss`` (softmax
  variant, 1e-5 inside the batch log). ``groups`` splits the latents into that
  many equal consecutive groups, each with its own mean distribution, and
  averages the groups' losses: the official loss ran on each GPU's images and
  DDP averaged them (the batch term is not linear in the batch).
  """
  logits = affinity.reshape(groups, -1, affinity.shape[-1]).astype(jnp.float32)
  logits = logits / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  avg_probs = jnp.mean(probs, axis=1)
  avg_entropy = -jnp.mean(jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5), axis=-1))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


# The aux key of a quantizer's code histogram (FQGAN: ``code_counts/<branch>``).
COUNTS = "code_counts"


def code_counts(codes: jax.Array, num_codes: int) -> jax.Array:
  """The histogram of ``codes`` (int, any shape, values in 0..num_codes-1):
  float32 (num_codes,)."""
  return jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def usage_from_counts(counts: jax.Array) -> dict[str, jax.Array]:
  """Codebook usage and perplexity of a code histogram ``counts`` (float
  (num_codes,), any positive scale: a mean of histograms gives the same).

  Perplexity is exp(entropy of the code histogram): num_codes when uniform, 1 when
  every latent maps to one code. Returns float32 scalars {"usage" in [0, 1],
  "perplexity" in [1, num_codes]}.
  """
  probs = counts / jnp.maximum(jnp.sum(counts), 1e-30)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))
  return {"usage": jnp.mean((counts > 0).astype(jnp.float32)),
          "perplexity": jnp.exp(entropy)}


def _uniform_init(num_codes: int, normalize: bool = False):
  """U(-1/K, 1/K), the init of the official VQGAN / LlamaGen codebooks.

  With ``normalize`` each row is then L2-normalised, as LlamaGen / FQGAN store
  their l2_norm codebooks: the forward pass is the same either way, but the
  stored scale sets how far one Adam step turns a code.
  """
  def init(key, shape, dtype=jnp.float32):
    e = jax.random.uniform(key, shape, jnp.float32, -1.0 / num_codes,
                           1.0 / num_codes)
    return (l2_normalize(e) if normalize else e).astype(dtype)
  return init


class VectorQuantizer(nn.Module):
  """Nearest-neighbour vector quantizer with a straight-through estimator.

  Attributes:
    num_codes: codebook entries K.
    code_dim: code width D (the last axis of the latents).
    beta: commitment-loss weight.
    l2_norm: L2-normalise latents and codes before the search (LlamaGen/FQGAN);
      the quantized output then lies on the unit sphere, and the codebook is
      initialised already normalised (as the official code does).
    entropy_weight: weight of the entropy loss in ``quantizer_loss`` (0 = skip it).
    entropy_temperature: softmax temperature on negative distances.
    entropy_group_size: images per entropy group in training (the official
      per-GPU batch, see :func:`entropy_loss`); 0 = the whole batch. Must
      divide the training (micro-)batch.
    param_dtype: codebook dtype.

  The codebook parameter is ``embedding`` (K, D) with logical axes
  ("vocab", "codebook_dim"), matching torch ``nn.Embedding.weight``.
  """
  num_codes: int
  code_dim: int
  beta: float = 0.25
  l2_norm: bool = False
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  entropy_group_size: int = 0
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        layers.named(_uniform_init(self.num_codes, self.l2_norm),
                     ("vocab", "codebook_dim")),
        (self.num_codes, self.code_dim), self.param_dtype)

  def codebook(self) -> jax.Array:
    """(K, D) float32 codebook as used in the search (normalised if l2_norm)."""
    e = jnp.asarray(self.embedding, jnp.float32)
    return l2_normalize(e) if self.l2_norm else e

  def _check(self, z: jax.Array):
    if z.shape[-1] != self.code_dim:
      raise errors.ConfigError(
          f"Latents have width {z.shape[-1]} but the codebook has "
          f"code_dim={self.code_dim}; project the latents to "
          f"{self.code_dim} channels (or change code_dim).")

  def _prepare(self, z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    return l2_normalize(z) if self.l2_norm else z

  def nearest(self, z: jax.Array) -> jax.Array:
    """Codes of latents: (..., D) -> (...) int32 in 0..K-1. Raises
    ``ConfigError`` when D != ``code_dim``."""
    self._check(z)
    zf = self._prepare(z).reshape(-1, self.code_dim)
    d = squared_distances(zf, self.codebook())
    return jnp.argmin(d, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

  def _entropy_groups(self, batch: int, train: bool) -> int:
    if not train:      # a reported value only: any evaluation batch is one group
      return 1
    g = self.entropy_group_size or batch
    if batch % g:
      raise errors.ConfigError(
          f"Batch {batch} is not divisible by config.model.entropy_group_size "
          f"{g}; set it to a divisor of the (micro-)batch, or 0 for the whole "
          "batch.")
    return batch // g

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Latents of codes: (...) int -> (..., D) float32 (normalised rows when
    l2_norm). Raises ``TypeError`` for non-integer codes."""
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise TypeError(f"codes must be integers, got dtype {codes.dtype}.")
    return jnp.take(self.codebook(), codes, axis=0)

  def __call__(self, z: jax.Array, train: bool = False):
    """Quantizes latents.

    Args:
      z: (..., D) latents (any float dtype; the search runs in float32).
      train: the entropy loss in groups of ``entropy_group_size`` images
        (the leading axis of ``z``); otherwise over all latents. Losses are
        always returned.

    Returns:
      z_q: (..., D) float32, straight-through (forward value = code vectors,
        gradient = identity to ``z``; to the normalised ``z`` when l2_norm).
      codes: (...) int32.
      aux: dict of float32 scalars: quantizer_loss, codebook_loss,
        commitment_loss (unweighted), entropy_loss (unweighted, 0 when
        entropy_weight == 0), usage, perplexity, and the codes' histogram
        code_counts (num_codes,) float32 (training sums it over micro-batches).

    Raises:
      ConfigError: D != ``code_dim``, or (training with an entropy loss) a
        leading axis that ``entropy_group_size`` does not divide.
    """
    self._check(z)
    lead = z.shape[:-1]
    zn = self._prepare(z)
    zf = zn.reshape(-1, self.code_dim)
    d = squared_distances(zf, self.codebook())
    codes = jnp.argmin(d, axis=1).astype(jnp.int32)
    z_q = jnp.take(self.codebook(), codes, axis=0).reshape(zn.shape)
    codes = codes.reshape(lead)

    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(zn)))
    commitment_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - zn))
    total = codebook_loss + self.beta * commitment_loss
    ent = jnp.zeros((), jnp.float32)
    if self.entropy_weight:
      ent = entropy_loss(-d, self.entropy_temperature,
                         self._entropy_groups(lead[0] if lead else 1, train))
      total = total + self.entropy_weight * ent
    counts = code_counts(codes, self.num_codes)
    aux = {"quantizer_loss": total, "codebook_loss": codebook_loss,
           "commitment_loss": commitment_loss, "entropy_loss": ent,
           COUNTS: counts, **usage_from_counts(counts)}
    z_st = zn + jax.lax.stop_gradient(z_q - zn)
    return z_st, codes, aux
