"""FAR: the factorized autoregressive generator of FQGAN (Bai et al. 2024).

A LlamaGen GPT backbone (RMSNorm, SwiGLU, 2D RoPE, one class token) runs over the
raster grid of positions. Each position holds k sub-tokens (Dual: vis, sem;
Triple: vis, sem_mid, sem_high), one per sub-codebook; their k embeddings are
concatenated and projected to the width by ``aggregation_layer``. A small causal
transformer, the factorized AR head (``ar_head_{i}``), then runs *per position*
over the length-k sequence ``[h_t, emb_1(z_t1), ..., emb_{k-1}(z_t,k-1)]`` and its
i-th output predicts sub-token i. Module names follow the official model
(``tok_embeddings_{1..k}``, ``output_{1..k}`` 1-based as there; ``layers_{i}``,
``ar_head_{i}`` 0-based); inside a block the shared ``layers.attention.Attention``
(``attention/{qkv, out}``, official ``wqkv`` / ``wo``) and gated
``layers.mlp.Mlp`` (``feed_forward/{fc1_g, fc1_x, fc2}``, official ``w1`` /
``w3`` / ``w2``); ``genvis_jax/convert/far.py`` holds that table.

RoPE (LlamaGen ``precompute_freqs_cis_2d``, ``layers.attention.rope_tables_2d``):
tables of ``1 + grid**2`` rows, row 0 (the class token) all zeros (this zeroes
q and k there, as in LlamaGen), row 1 + p the 2D rotation of raster position p.
Backbone position t uses row t (the class token at 0, the embedding of token
t-1 at t). The head reuses rows 0..k-1 for its k positions. The norms are
``layers.RMSNorm``.

Entry points (``model.apply(..., method=...)``):
  ``__call__(codes, labels, train=False)`` teacher-forced forward.
  ``prefill(labels)``, ``backbone_step(codes, index)``, ``head_step(x, code, i)``:
  KV-cached decoding in the mutable ``"cache"`` collection.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype, RMSNorm
from genvis_jax.models.layers.attention import Attention, rope_tables_2d
from genvis_jax.models.layers.mlp import Mlp


def find_multiple(n: int, k: int) -> int:
  """The smallest multiple of ``k`` that is >= ``n`` (LlamaGen's helper)."""
  return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(dim: int, multiple_of: int = 256,
                   ffn_dim_multiplier: float = 1.0) -> int:
  """LlamaGen SwiGLU width: ``find_multiple(int(mult * int(2 * 4d / 3)), m)``."""
  hidden = int(2 * 4 * dim / 3)
  hidden = int(ffn_dim_multiplier * hidden)
  return find_multiple(hidden, multiple_of)


class TransformerBlock(nn.Module):
  """Pre-norm LlamaGen block; residual stream kept in the input dtype (fp32)."""
  n_head: int
  ffn_dim: int
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attn_dropout: float = 0.0
  cache_len: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, train=False, cache_pos=None):
    """x (B, S, d), rope ``(cos, sin)`` (S, hd/2) -> (B, S, d); ``cache_pos``
    as ``layers.attention.Attention`` (KV cache of ``cache_len``)."""
    # The official init of every Linear / Embedding: normal(0, 0.02).
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=layers.default_kernel_init)
    pd = self.param_dtype
    h = Attention(self.n_head, qkv_bias=False, out_bias=False, mask="causal",
                  cache_len=self.cache_len, attn_dropout=self.attn_dropout,
                  proj_dropout=self.dropout, name="attention", **kw)(
                      RMSNorm(self.norm_eps, pd, name="attention_norm")(x),
                      rope=rope, train=train, cache_pos=cache_pos)
    x = x + h.astype(x.dtype)
    # LlamaGen FeedForward: SwiGLU, dropout after w2 only.
    h = Mlp(self.ffn_dim, activation="silu", gated=True, dropout=self.dropout,
            hidden_dropout=0.0, use_bias=False, name="feed_forward", **kw)(
                RMSNorm(self.norm_eps, pd, name="ffn_norm")(x), train)
    x = x + h.astype(x.dtype)
    return layers.constrain_tokens(x)


class LabelEmbedder(nn.Module):
  """Class table with one extra row (index num_classes) for the null class:
  int labels (B,) in 0..num_classes -> (B, dim) in ``param_dtype``."""
  num_classes: int
  dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    return layers.embed(self.num_classes + 1, self.dim,
                        init=layers.default_kernel_init,
                        dtype=self.param_dtype, param_dtype=self.param_dtype,
                        name="embedding_table")(labels)


class FAR(nn.Module):
  """Factorized AR generator (see the module docstring).

  Attributes mirror ``config.model`` (``build`` maps them); ``k`` =
  ``num_codebooks`` sub-tokens per position, ``grid**2`` positions.
  """
  num_codebooks: int = 2
  codebook_size: int = 16384
  num_classes: int = 1000
  grid: int = 16
  dim: int = 1024
  n_layer: int = 24
  n_head: int = 16
  n_head_layer: int = 3
  ffn_dim: int = 2816
  norm_eps: float = 1e-5
  rope_base: float = 10000.0
  dropout: float = 0.1          # residual (after wo) and FFN output dropout
  token_dropout: float = 0.1    # on the backbone input sequence
  attn_dropout: float = 0.0
  class_dropout: float = 0.1    # label -> null class in training (CFG)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"

  @property
  def seq_len(self) -> int:
    """Raster positions per image: ``grid ** 2``."""
    return self.grid * self.grid

  @property
  def null_label(self) -> int:
    """The null-class label (CFG's unconditional row): ``num_classes``."""
    return self.num_classes

  def setup(self):
    d, k, pd = self.dim, self.num_codebooks, self.param_dtype
    self.cls_embedding = LabelEmbedder(self.num_classes, d, pd)
    for i in range(k):  # official 1-based names
      setattr(self, f"tok_embeddings_{i + 1}", layers.embed(
          self.codebook_size, d, init=layers.default_kernel_init, dtype=pd,
          param_dtype=pd))
      # fp32 logits (as RAR's lm_head): the loss and the sampler's
      # guidance, temperature and filters read them.
      setattr(self, f"output_{i + 1}", layers.dense(
          self.codebook_size, ("embed", "vocab"), use_bias=False,
          kernel_init=layers.zeros, dtype=jnp.float32, param_dtype=pd))
    self.aggregation_layer = layers.dense(
        d, ("mlp", "embed"), kernel_init=layers.default_kernel_init,
        dtype=self.dtype, param_dtype=pd)
    kw = dict(n_head=self.n_head, ffn_dim=self.ffn_dim,
              norm_eps=self.norm_eps, dropout=self.dropout,
              attn_dropout=self.attn_dropout, dtype=self.dtype, param_dtype=pd)
    block = layers.maybe_remat(TransformerBlock, self.remat, static_argnums=(3,))
    self.layers = [block(cache_len=self.seq_len + 1, **kw)
                   for _ in range(self.n_layer)]                    # layers_{i}
    self.ar_head = [block(cache_len=k, **kw)
                    for _ in range(self.n_head_layer)]              # ar_head_{i}
    self.norm = RMSNorm(self.norm_eps, pd)
    self.tok_dropout = nn.Dropout(self.token_dropout)

  # --- pieces -----------------------------------------------------------------
  def _tok(self, i: int):
    """Embedding table of sub-token i (0-based)."""
    return getattr(self, f"tok_embeddings_{i + 1}")

  def _rope(self):
    """(cos, sin), each (1 + grid**2, hd/2) float32 (``rope_tables_2d``)."""
    return rope_tables_2d(self.grid, self.dim // self.n_head, self.rope_base)

  def _aggregate(self, embs):
    """k arrays (..., d) -> (..., d): concat then ``aggregation_layer``."""
    x = self.aggregation_layer(jnp.concatenate(embs, axis=-1))
    return layers.constrain_tokens(x.astype(self.param_dtype))

  def class_labels(self, labels, train: bool = False):
    """labels (B,) with each replaced by the null class w.p. ``class_dropout``
    when ``train`` (rng stream ``"dropout"``)."""
    if not train or self.class_dropout <= 0:
      return labels
    return layers.drop_labels(self.make_rng("dropout"), labels,
                              self.class_dropout, self.null_label)

  def _head_out(self, x, i: int):
    """Shared final norm + ``output_{i+1}``; x (..., d) -> fp32 (..., V)."""
    return getattr(self, f"output_{i + 1}")(self.norm(x))

  # --- teacher-forced forward ------------------------------------------------------
  def __call__(self, codes, labels, train=False):
    """Teacher-forced forward.

    Args:
      codes: int (B, k, N) sub-token maps, k = num_codebooks in the tokenizer's
        order (vis, sem[, ...]), each flattened row-major (N = grid**2).
      labels: int (B,) classes 0..num_classes-1, or num_classes (null class).
      train: enables dropout and class dropout (rng stream ``"dropout"``).
    Returns:
      fp32 logits (B, k, N, codebook_size): ``logits[:, i, t]`` predicts
      ``codes[:, i, t]`` from the class, all sub-tokens of positions < t and
      sub-tokens < i of position t. Targets are ``codes`` itself (no shift).
    Raises:
      ValueError: codes not 3-D, or labels not (B,).
      ConfigError: k != ``num_codebooks`` or N != ``grid ** 2`` (naming the
        config key to set).
    """
    b, k, n = self._check(codes, labels)
    cond = self.cls_embedding(self.class_labels(labels, train))      # (B, d)
    embs = [self._tok(i)(codes[:, i]) for i in range(k)]             # k x (B, N, d)
    tok = self._aggregate(embs)
    x = jnp.concatenate([cond[:, None].astype(tok.dtype), tok[:, :-1]], axis=1)
    x = self.tok_dropout(layers.constrain_tokens(x), deterministic=not train)
    cos, sin = self._rope()
    for blk in self.layers:
      x = blk(x, (cos[:n], sin[:n]), train)
    # Factorized head: per position, [h_t, emb_1(z_t1), ..] -> B*N sequences.
    y = jnp.stack([x] + embs[:k - 1], axis=2).reshape(b * n, k, self.dim)
    y = layers.constrain_tokens(y)
    for blk in self.ar_head:
      y = blk(y, (cos[:k], sin[:k]), train)
    y = y.reshape(b, n, k, self.dim)
    return jnp.stack([self._head_out(y[:, :, i], i) for i in range(k)], axis=1)

  def _check(self, codes, labels):
    """codes (B, k, N) against the config: ValueError for another layout,
    ConfigError naming the config key for another k or N."""
    if codes.ndim != 3:
      raise ValueError(
          f"codes must have shape (B, num_codebooks, grid**2) = (B, "
          f"{self.num_codebooks}, {self.seq_len}), got {codes.shape}; "
          "reshape (B, k*N) token arrays to (B, k, N).")
    k, n = codes.shape[1:]
    if k != self.num_codebooks:
      raise ConfigError(
          f"codes hold {k} sub-token maps (shape {codes.shape}) but "
          f"config.model.num_codebooks={self.num_codebooks}: set "
          f"config.model.num_codebooks={k} (the tokenizer's number of "
          "codebooks) or use the tokenizer this model was configured for.")
    if n != self.seq_len:
      side = math.isqrt(n)
      fix = (f"set config.model.grid={side}" if side * side == n else
             "use codes of a square grid")
      raise ConfigError(
          f"codes hold {n} positions per map (shape {codes.shape}) but "
          f"config.model.grid={self.grid} gives grid**2={self.seq_len}: "
          f"{fix} (the tokenizer's code-map side, image size / downsampling "
          "factor) or use the tokenizer this model was configured for.")
    if labels.shape != codes.shape[:1]:
      raise ValueError(f"labels must have shape ({codes.shape[0]},), got "
                       f"{labels.shape}.")
    return codes.shape

  # --- KV-cached decoding ----------------------------------------------------------
  def _backbone(self, x, rope, pos):
    for blk in self.layers:
      x = blk(x, rope, False, pos)
    return x[:, 0]

  def prefill(self, labels):
    """Feeds the class token (backbone position 0) into the cache.

    labels (B,) -> hidden h (B, d) that starts the head for raster position 0.
    Apply with ``mutable=["cache"]`` (creates the cache, length grid**2 + 1).
    """
    x = self.cls_embedding(labels)[:, None]
    return self._backbone(x, tuple(t[:1] for t in self._rope()), 0)

  def backbone_step(self, codes, index):
    """Feeds the k sub-tokens of raster position ``index`` (0-based).

    codes int (B, k); index int scalar (may be traced). Returns h (B, d) for
    raster position ``index + 1``.
    """
    x = self._aggregate([self._tok(i)(codes[:, i : i + 1]) for i in
                         range(self.num_codebooks)])          # (B, 1, d)
    pos = index + 1
    rope = tuple(jax.lax.dynamic_slice_in_dim(t, pos, 1) for t in self._rope())
    return self._backbone(x, rope, pos)

  def head_step(self, x, code, i: int):
    """Head position ``i`` (static, 0..k-1) of the current raster position.

    ``i == 0``: x is the backbone hidden h (B, d) and ``code`` is ignored;
    ``i > 0``: ``code`` int (B,) is the sampled sub-token i-1 (x ignored).
    Returns fp32 logits (B, codebook_size) for sub-token i. The head cache
    (length k) is overwritten from slot 0 at every raster position. Raises
    ``ValueError`` for ``i`` outside 0..k-1.
    """
    if not 0 <= i < self.num_codebooks:
      raise ValueError(f"head step i={i} must be in 0..{self.num_codebooks - 1}.")
    y = (x if i == 0 else self._tok(i - 1)(code))[:, None]
    rope = tuple(t[i:i + 1] for t in self._rope())
    for blk in self.ar_head:
      y = blk(y, rope, False, i)
    return self._head_out(y[:, 0], i)


def example_inputs(cfg, batch_size: int = 1):
  """(codes int32 zeros (batch_size, num_codebooks, grid**2), labels int32
  zeros (batch_size,)): the arguments of ``FAR.__call__``."""
  return (jnp.zeros((batch_size, cfg.get("num_codebooks", FAR.num_codebooks),
                    cfg.get("grid", FAR.grid) ** 2), jnp.int32),
          jnp.zeros((batch_size,), jnp.int32))


# Config keys of LlamaGen's SwiGLU width rule (ffn_hidden_dim's arguments).
_FFN_RULE = ("multiple_of", "ffn_dim_multiplier")
# Fields whose builder derives them from others when unset, at the config
# value meaning unset (``models.config_defaults``).
CONFIG_UNSET = {"ffn_dim": 0}


def build(cfg) -> FAR:
  """``config.model`` -> FAR; unset fields take the class defaults (FAR-B,
  Dual). The SwiGLU width is ``ffn_dim`` or, unset / 0, LlamaGen's rule
  ``ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)``. Raises
  ConfigError for an unknown key, a width the heads do not divide, a head
  dimension 2D RoPE cannot split (not divisible by 4) or num_codebooks < 1."""
  ffn = {}
  if not cfg.get("ffn_dim"):
    ffn["ffn_dim"] = ffn_hidden_dim(cfg.get("dim", FAR.dim),
                                    **{k: cfg[k] for k in _FFN_RULE if k in cfg})
  model = FAR(**models.config_fields(cfg, FAR, derived=_FFN_RULE, **ffn))
  layers.check_heads("config.model.n_head", model.n_head, model.dim,
                     "config.model.dim")
  head_dim = model.dim // model.n_head
  if head_dim % 4:
    raise ConfigError(
        f"2D RoPE needs a head dimension divisible by 4; config.model.dim / "
        f"config.model.n_head is {model.dim} / {model.n_head} = {head_dim}: "
        "change config.model.dim or config.model.n_head (e.g. dim a multiple "
        "of 4 * n_head).")
  if model.num_codebooks < 1:
    raise ConfigError(f"config.model.num_codebooks={model.num_codebooks} "
                      "must be at least 1.")
  return model
