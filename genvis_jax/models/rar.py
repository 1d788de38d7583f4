"""RAR generator: a class-conditional causal transformer over VQ tokens.

Randomized AutoRegressive modelling (Yu et al. 2024): image tokens are trained in
a random order (annealed to raster), and a *target-aware* positional embedding
tells every position which token it must predict next. Blocks compose the shared
``layers.attention.Attention`` (QK-norm, causal, KV cache) and ``layers.mlp.Mlp``;
``genvis_jax/convert/rar.py`` maps the official names (``attn.proj`` -> ``attn/out``).

Token-id layout of the ``embeddings`` table (codebook V, classes C):
  0..V-1 image codes, V unused mask id, V+1+c class c, V+1+C the null class.
Sequence: ``[cls_token, class_token, img_0 .. img_{L-1}]`` (prefix 2).

Entry points (``model.apply(..., method=...)``):
  ``__call__(tokens, labels, orders=None, train=False)`` full (training) forward.
  ``prefill(labels)`` / ``decode_step(token, labels, index)``: raster-order
  decoding with a KV cache held in the mutable ``"cache"`` collection.
  ``decode_modulation`` / ``prefill_modulated`` / ``decode_step_modulated``:
  the same decoding with the adaLN modulation precomputed per (condition,
  position) (what ``genvis_jax.sample.rar`` runs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers.attention import Attention
from genvis_jax.models.layers.mlp import Mlp

PREFIX = 2  # cls token + class token


def permute(x, orders):
  """Gathers ``x[b, orders[b]]``; x (B, L, ...), orders (B, L) -> (B, L, ...)."""
  idx = orders.reshape(orders.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def position_embeddings(pos_embed, ta_embed, orders):
  """The positional term added to ``[cls, class, img_{orders}...]``.

  pos_embed, ta_embed: (P, d) tables (P >= L + 2); orders (B, L) permutation of
  image positions. Returns (B, L + 2, d):
    pos: ``[pos[0], pos[1], pos[2 + orders]]`` (tokens keep their own position);
    target-aware: ``[0, ta[2 + orders[0]], ..., ta[2 + orders[L-1]], 0]``, i.e.
    each position gets the position of the *next* token to predict.
  """
  b, n = orders.shape
  d = pos_embed.shape[-1]
  pos_embed, ta_embed = layers.whole(pos_embed), layers.whole(ta_embed)
  img_pos = pos_embed[PREFIX:PREFIX + n][orders]                 # (B, L, d)
  pos = jnp.concatenate(
      [jnp.broadcast_to(pos_embed[:PREFIX], (b, PREFIX, d)), img_pos], axis=1)
  ta = ta_embed[PREFIX:PREFIX + n][orders]                       # (B, L, d)
  zero = jnp.zeros((b, 1, d), ta.dtype)
  return pos + jnp.concatenate([zero, ta, zero], axis=1)


class Block(nn.Module):
  """adaLN-Zero pre-norm block; x (B, N, d), c (B, N, d) per-position condition.

  With ``rows`` (B,) int, ``c`` is a (U, N, d) table of distinct conditions and
  sample b uses row ``rows[b]`` (see ``RAR.adaln_table``). Decoding may pass
  the modulation itself, ``mod`` (B, N, 6d) (``c`` then unused), and with
  ``x=None`` the block returns its modulation of ``c`` instead (so a sampler
  computes it once per condition, not once per step). Returns the updated
  x (B, N, d), or, when ``x`` is None, the modulation (..., N, 6d) in
  ``dtype``.
  """
  dim: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  cache_len: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, train=False, cache_pos=None, rows=None, mod=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if mod is None:
      mod = layers.dense(6 * self.dim, ("embed", "mlp"), kernel_init=layers.zeros,
                         name="adaLN_modulation", **kw)(nn.silu(c))
      if rows is not None:
        mod = jnp.take(mod, rows, axis=0)
    if x is None:
      return mod
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        jnp.split(mod, 6, axis=-1))
    # The norms return float32 (layers.norm_dtype), so modulate runs in
    # float32 and the bf16 qkv / fc1 round its result once, as under autocast.
    h = layers.layer_norm(1e-6, name="norm1", **kw)(x)
    h = Attention(self.num_heads, qk_norm=True, mask="causal",
                  cache_len=self.cache_len, attn_dropout=self.attn_dropout,
                  proj_dropout=self.dropout, name="attn", **kw)(
                      layers.modulate(h, shift_msa, scale_msa), train=train,
                      cache_pos=cache_pos)
    x = x + gate_msa * h
    h = layers.layer_norm(1e-6, name="norm2", **kw)(x)
    h = Mlp(self.mlp_dim, dropout=self.dropout, name="mlp", **kw)(
        layers.modulate(h, shift_mlp, scale_mlp), train)
    x = x + gate_mlp * h
    return layers.constrain_tokens(x)


class FinalLayer(nn.Module):
  """Head adaLN: non-affine LN, modulation chunked (scale, shift) — reversed.
  x (..., d) -> float32 (..., d); modulation (..., 2d) float32."""
  dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, rows=None, mod=None):
    """As ``Block``: ``mod`` (B, ..., 2d) replaces the modulation of ``c``;
    ``x=None`` returns the modulation."""
    if mod is None:
      mod = layers.dense(2 * self.dim, ("embed", "mlp"), kernel_init=layers.zeros,
                         param_dtype=self.param_dtype, dtype=jnp.float32,
                         name="adaLN_modulation")(nn.silu(c))
      if rows is not None:
        mod = jnp.take(mod, rows, axis=0)
    if x is None:
      return mod
    scale, shift = jnp.split(mod, 2, axis=-1)
    x = layers.layer_norm(1e-6, use_scale=False, use_bias=False,
                          dtype=jnp.float32, name="norm_final")(x)
    return layers.modulate(x, shift, scale)


class RAR(nn.Module):
  """RAR generator (see module docstring for the id layout and the sequence).

  Attributes mirror ``config.model`` (``build`` maps them).
  """
  hidden_size: int = 768
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 3072
  codebook_size: int = 1024
  num_classes: int = 1000
  seq_len: int = 256
  dropout: float = 0.1
  attn_dropout: float = 0.1
  max_pos: int = 1280
  num_timesteps: int = 356
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  # The adaLN input depends only on (class, position): with few classes and a
  # large batch, modulate the (num_classes + 1, N) table once and gather rows
  # per sample. Same values; cheaper when the per-device batch exceeds
  # num_classes + 1 (the 10-class demo: RAR step 25% faster). Off for ImageNet.
  adaln_table: bool = False

  @property
  def null_label(self) -> int:
    """The null-class label (CFG's unconditional row): ``num_classes``."""
    return self.num_classes

  @property
  def cache_len(self) -> int:
    """KV-cache length: ``seq_len`` + the 2 prefix positions."""
    return self.seq_len + PREFIX

  def setup(self):
    d, pdt = self.hidden_size, self.param_dtype
    if self.seq_len + PREFIX > min(self.max_pos, self.num_timesteps):
      raise ConfigError(
          f"seq_len + 2 = {self.seq_len + PREFIX} exceeds max_pos={self.max_pos} "
          f"or num_timesteps={self.num_timesteps}; raise them in config.model.")
    tn = layers.default_kernel_init
    self.cls_token = self.param(
        "cls_token", layers.named(layers.zeros, (None, None, "embed")),
        (1, 1, d), pdt)
    self.pos_embed = self.param(
        "pos_embed", layers.named(tn, (None, "pos", "embed")),
        (1, self.max_pos, d), pdt)
    self.target_aware_pos_embed = self.param(
        "target_aware_pos_embed", layers.named(tn, (None, "pos", "embed")),
        (1, self.max_pos, d), pdt)
    self.timesteps_embeddings = self.param(
        "timesteps_embeddings", layers.named(tn, (None, "pos", "embed")),
        (1, self.num_timesteps, d), pdt)
    # Residual stream stays in param dtype (like torch autocast); matmuls in dtype.
    self.embeddings = layers.embed(
        self.codebook_size + 1 + self.num_classes + 1, d, dtype=pdt,
        param_dtype=pdt)
    kw = dict(dim=d, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
              dropout=self.dropout, attn_dropout=self.attn_dropout,
              cache_len=self.cache_len, dtype=self.dtype, param_dtype=pdt)
    block_cls = layers.maybe_remat(Block, self.remat, static_argnums=(3,))
    self.blocks = [block_cls(**kw) for _ in range(self.depth)]  # blocks_{i}
    self.adaln_before_head = FinalLayer(d, pdt)
    self.lm_head = layers.dense(self.codebook_size, ("embed", "vocab"),
                                dtype=jnp.float32, param_dtype=pdt)

  def _class_embedding(self, labels):
    return self.embeddings(labels + self.codebook_size + 1)

  def _head(self, x, c, rows=None):
    x = self.adaln_before_head(x.astype(jnp.float32), c.astype(jnp.float32),
                               rows)
    return self.lm_head(x)

  def __call__(self, tokens, labels, orders=None, train=False):
    """Teacher-forced forward in the order ``orders``.

    Args:
      tokens: int (B, L) image codes in raster order, 0..codebook_size-1.
      labels: int (B,) classes 0..num_classes-1, or num_classes for the null
        class (CFG / label dropout).
      orders: int (B, L) per-sample permutation of 0..L-1 (None = raster).
      train: enables dropout (rng stream ``"dropout"``).
    Returns:
      fp32 logits (B, 1 + L, codebook_size), e.g. (B, 257, 1024) for 256
      tokens; the cls position is dropped. Position 0 is the class token
      (predicts the first token of the order), position 1 + j is the j-th
      permuted image token (predicts token j + 1). Targets for
      ``logits[:, :-1]`` are ``permute(tokens, orders)``.
    Raises:
      ConfigError: L != ``seq_len``, or (at setup) ``seq_len + 2`` above
        ``max_pos`` or ``num_timesteps``.
      ValueError: labels not (B,), or orders not (B, L).
    """
    b, n = tokens.shape
    if n != self.seq_len:
      raise ConfigError(
          f"tokens have length {n}, config.model.seq_len is "
          f"{self.seq_len}: set config.model.seq_len={n} (the tokenizer's "
          "tokens per image) or use the tokenizer this model was "
          "configured for.")
    if labels.shape != (b,):
      raise ValueError(f"labels must have shape ({b},), got {labels.shape}.")
    if orders is None:
      orders = jnp.broadcast_to(jnp.arange(n), (b, n))
    elif orders.shape != (b, n):
      raise ValueError(f"orders must have shape {(b, n)}, got {orders.shape}.")
    cond = self._class_embedding(labels)                          # (B, d)
    img = self.embeddings(permute(tokens, orders))                 # (B, L, d)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.hidden_size))
    x = jnp.concatenate([cls.astype(img.dtype), cond[:, None], img], axis=1)
    x = x + position_embeddings(self.pos_embed[0], self.target_aware_pos_embed[0],
                                orders)
    rows = None
    if self.adaln_table:    # (num_classes + 1, N, d): one row per label value
      cond = self._class_embedding(jnp.arange(self.num_classes + 1))
      rows = labels
    c = cond[:, None] + self.timesteps_embeddings[:, :n + PREFIX]
    for blk in self.blocks:
      x = blk(x, c, train, None, rows)
    return self._head(x[:, 1:], c[:, 1:], rows)

  # --- KV-cached raster decoding -----------------------------------------------
  def _prefix_inputs(self, cond):
    """``[cls, class]`` + their position embeddings (the class slot also gets
    the target-aware embedding of raster token 0): (B, 2, d)."""
    cls = jnp.broadcast_to(self.cls_token, (cond.shape[0], 1, self.hidden_size))
    x = jnp.concatenate([cls.astype(cond.dtype), cond[:, None]], axis=1)
    pe = self.pos_embed[0, :PREFIX]
    return x + pe.at[1].add(self.target_aware_pos_embed[0, PREFIX])

  def _step_inputs(self, token, index):
    """Raster token ``index`` embedded at its cache position with the
    target-aware embedding of token ``index + 1`` (none after the last):
    ``(pos, x (B, 1, d))``."""
    pos = PREFIX + index
    nxt = jnp.where(index + 1 < self.seq_len, 1.0, 0.0)  # last token: no target
    pe = (jax.lax.dynamic_index_in_dim(self.pos_embed[0], pos, keepdims=False)
          + nxt * jax.lax.dynamic_index_in_dim(
              self.target_aware_pos_embed[0], jnp.minimum(pos + 1, self.max_pos - 1),
              keepdims=False))
    return pos, (self.embeddings(token) + pe)[:, None]

  def prefill(self, labels):
    """Writes ``[cls, class]`` (positions 0, 1) into the cache.

    labels (B,) -> fp32 logits (B, codebook_size) for raster token 0 (equals
    ``__call__(...)[:, 0]``). Apply with ``mutable=["cache"]``; the cache is
    created on the first call (length seq_len + 2).
    """
    return self.prefill_modulated(labels,
                                  self.decode_modulation(labels, 0, PREFIX))

  def decode_step(self, token, labels, index):
    """Feeds raster token ``index`` (0-based) and predicts token ``index + 1``.

    token, labels: int (B,); index: int scalar (may be traced).
    Returns fp32 logits (B, codebook_size) equal to ``__call__(...)[:, 1 + index]``.
    The modulation is computed for this step only; a sampler computes it once
    per condition instead (``decode_modulation``).
    """
    mods = self.decode_modulation(labels, PREFIX + index, 1)
    return self.decode_step_modulated(token, mods, index)

  # --- decoding with the modulation computed once per (condition, position) ---
  # The adaLN input depends only on (class, position), so a sampler computes
  # the modulation of every block per condition (with CFG: the B classes and
  # the null class once) over a range of positions in one batched matmul, and
  # each decode step only passes its rows: the step no longer reads the 6d x d
  # adaLN weights (a third of a block's weights).
  def decode_modulation(self, labels, start, length: int):
    """Modulation tables of cache positions ``start .. start + length - 1``.

    labels int (U,) conditions (classes, or num_classes = null); start int
    scalar (may be traced), length static. Returns ``(blocks, head)``: a
    tuple of ``depth`` arrays (U, length, 6d) in ``dtype`` and one fp32
    (U, length, 2d) for the final layer.
    """
    cond = self._class_embedding(labels)
    ts = jax.lax.dynamic_slice_in_dim(self.timesteps_embeddings[0], start, length)
    c = cond[:, None] + ts[None]
    # train=False positionally: a remat-wrapped block takes it as static.
    blocks = tuple(blk(None, c, False) for blk in self.blocks)
    return blocks, self.adaln_before_head(None, c.astype(jnp.float32))

  def _decode_modulated(self, x, mods, pos):
    """x (R, N, d) at cache positions pos..; mods as ``decode_modulation``,
    one row per sequence (R, N, ...) for those N positions."""
    blocks, head = mods
    for blk, m in zip(self.blocks, blocks):
      x = blk(x, None, False, pos, mod=m)
    h = x[:, -1].astype(jnp.float32)
    h = self.adaln_before_head(h, None, mod=head[:, -1])
    return self.lm_head(h)

  def prefill_modulated(self, labels, mods):
    """``prefill`` with precomputed modulation: labels (R,), mods of cache
    positions 0..1 for each of the R sequences -> fp32 logits
    (R, codebook_size) for token 0."""
    cond = self._class_embedding(labels)
    return self._decode_modulated(self._prefix_inputs(cond), mods, 0)

  def decode_step_modulated(self, token, mods, index):
    """``decode_step`` with precomputed modulation: token (R,), mods of cache
    position ``PREFIX + index`` (length-1 rows, one per sequence) -> fp32
    logits (R, codebook_size) for token ``index + 1``."""
    pos, x = self._step_inputs(token, index)
    return self._decode_modulated(x, mods, pos)


# Fields whose builder derives them from others when unset, at the config
# value meaning unset (``models.config_defaults``).
CONFIG_UNSET = {"mlp_dim": 0}


def _mlp_dim(cfg) -> dict:
  """``mlp_dim`` (when set, non-zero) or ``hidden_size * mlp_ratio``."""
  if cfg.get("mlp_dim"):
    return {}
  hidden = cfg.get("hidden_size", RAR.hidden_size)
  return {"mlp_dim": int(hidden * cfg.get("mlp_ratio", 4.0))}


def example_inputs(cfg, batch_size: int = 1):
  """(tokens int32 zeros (batch_size, seq_len), labels int32 zeros
  (batch_size,)): the arguments of ``RAR.__call__``."""
  return (jnp.zeros((batch_size, cfg.get("seq_len", RAR.seq_len)), jnp.int32),
          jnp.zeros((batch_size,), jnp.int32))


def build(cfg) -> RAR:
  """``config.model`` -> RAR; unset fields take the class defaults (RAR-B).
  The MLP width is ``mlp_dim`` or ``hidden_size * mlp_ratio`` (default 4).
  ``seq_len`` is also read by ``example_inputs``. Raises ConfigError for an
  unknown key or a width the heads do not divide."""
  model = RAR(**models.config_fields(cfg, RAR, derived=("mlp_ratio",),
                                     **_mlp_dim(cfg)))
  layers.check_heads("config.model.num_heads", model.num_heads,
                     model.hidden_size, "config.model.hidden_size")
  return model
