"""Equivariant generator: windowed causal transformer over column tokens with a
rectified-flow MLP head (Dong et al. 2025).

Sequence: 16 condition tokens (class embedding + learned positions; the
learned ``fake_latent`` replaces the class for the null label) followed by the
image column latents projected by ``z_proj``; ``z_proj_ln`` normalises all of
them. Each block, in order:
  1. image tokens: windowed causal self-attention (key j visible to query i iff
     i - window < j <= i) with interleaved 1D RoPE at positions ``i + shift``;
  2. image tokens: cross-attention to the 16 condition tokens (RoPE on the
     queries only);
  3. image AND condition tokens: GELU MLP (condition tokens change only here).
The last condition token predicts column 0 and image position i predicts
column i + 1. The head (``diffloss/net``, in ``eq_flow_head.py``) is a
MAR-style MLP with adaLN conditioned on ``cond_embed(z) + time_embed(t)`` that
predicts the rectified-flow velocity ``eps - x`` of ``x_t = t * eps + (1 - t) * x``.

Column-by-column synthesis (``prefill`` / ``decode_step``) keeps, per layer, a
rolling key/value cache of ``window`` positions plus the cross-attention
keys/values of the condition tokens (fixed per label): memory and time per
column do not grow with the width, and the result equals the full forward.

Blocks compose the shared ``layers.attention.Attention`` (windowed self-attention
with a rolling cache; cross-attention with keys/values projected once per
sample, ``kv``) and ``layers.mlp.Mlp``. Parameter names follow the official
model (``.`` -> ``_`` before list indices) except the attention projections,
which ``genvis_jax/convert/eq.py`` renames (``attn.proj`` -> ``attn/out``,
``attn2.{qkv, k, v, proj}`` -> ``cross_attn/{q, k, v, out}``):
``class_emb/embedding``, ``fake_latent``, ``z_proj``, ``z_proj_ln``,
``encoder_pos_embed_learned``, ``encoder_blocks_{i}/{norm1, attn/qkv, attn/out,
cross_attn/q, cross_attn/k, cross_attn/v, cross_attn/out, cross_norm,
cross_cond_norm, norm2, mlp/fc1, mlp/fc2}``, ``encoder_norm``,
``diffloss/net/{time_embed/mlp_{0,2},
cond_embed, input_proj, res_blocks_{i}/{in_ln, mlp_0, mlp_2,
adaLN_modulation_1}, final_layer/{linear, adaLN_modulation_1}}``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models import layers
from genvis_jax.models.layers import Dtype
from genvis_jax.models.layers.attention import (Attention, empty_window_cache,
                                                 rope_tables)
from genvis_jax.models.layers.mlp import Mlp
from genvis_jax.models.eq_flow_head import DiffLoss, dense as _dense


# --- transformer ------------------------------------------------------------------

class Block(nn.Module):
  """Self-attention (image), cross-attention (image -> condition), MLP (all)."""
  num_heads: int
  mlp_dim: int
  window: int
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  attn_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, attn_dropout=self.attn_dropout,
                proj_dropout=self.proj_dropout,
                kernel_init=layers.xavier_uniform, **kw)
    self.norm1 = layers.layer_norm(1e-6, **kw)
    self.attn = Attention(mask="window", window=self.window,
                          attn_impl=self.attn_impl, **attn)
    self.cross_norm = layers.layer_norm(1e-5, **kw)
    self.cross_cond_norm = layers.layer_norm(1e-5, **kw)
    self.cross_attn = Attention(**attn)
    self.norm2 = layers.layer_norm(1e-6, **kw)
    self.mlp = Mlp(self.mlp_dim, dropout=self.proj_dropout,
                   kernel_init=layers.xavier_uniform, **kw)

  def _mlp(self, x, train):
    return x + self.mlp(self.norm2(x), train)

  def __call__(self, cond, img, cos, sin, train=False):
    """cond (B, M, d), img (B, N, d) -> updated (cond, img)."""
    img = img + self.attn(self.norm1(img), rope=(cos, sin), train=train)
    img = img + self.cross_attn(self.cross_norm(img),
                                self.cross_cond_norm(cond), rope=(cos, sin),
                                train=train)
    m = cond.shape[1]
    x = self._mlp(jnp.concatenate([cond, img], axis=1), train)
    x = layers.constrain_tokens(x)
    return x[:, :m], x[:, m:]

  def prefill(self, cond):
    """cond (B, M, d) -> (next layer's cond, (k, v) cross-attention cache)."""
    kv = self.cross_attn.kv(self.cross_cond_norm(cond))
    return self._mlp(cond, False), kv

  def step(self, img, cos, sin, index, cache):
    """One column img (B, 1, d) at position ``index`` -> (img, new cache).

    cache: dict(k, v) rolling self-attention cache and (ck, cv) cross k/v.
    """
    h, (k, v) = self.attn(self.norm1(img), rope=(cos, sin), cache_pos=index,
                          window_cache=(cache["k"], cache["v"]))
    img = img + h
    img = img + self.cross_attn(self.cross_norm(img), rope=(cos, sin),
                                kv=(cache["ck"], cache["cv"]))
    return self._mlp(img, False), {**cache, "k": k, "v": v}


# --- the model --------------------------------------------------------------------

class EqGenerator(nn.Module):
  """Class-conditional column generator (see module docstring).

  ``__call__(latents, labels, noise, t, train=False, shift=0)``:
    latents: (B, L, C) clean column latents (tokenizer latents x latent scale).
    labels: int (B,) classes 0..num_classes-1, or ``num_classes`` = null class
      (uses ``fake_latent``; label dropout / CFG).
    noise: (B, M, L, C) Gaussian noise, M draws per token (diffusion_batch_mul).
    t: (B, M, L) flow times in (0, 1].
    train: dropout on (rng stream ``"dropout"``).
    shift: int scalar or per-example (B,) int array (may be traced) added to
      the RoPE positions.
  Returns ``(velocity, z)``: velocity (B, M, L, C) float32 predicted for
  ``x_t = t * noise + (1 - t) * latents`` (target ``noise - latents``) and
  z (B, L, d) the per-column conditioning vectors (``condition``).

  Other methods: ``condition(latents, labels, train, shift)`` -> z (B, L, d);
  ``velocity(x_t, t, z)`` -> head output (= ``head_velocity(x_t,
  head_modulations(t, z))``); ``prefill(labels)`` ->
  (z for column 0 (B, d), cache); ``decode_step(latent, index, cache)`` feeds
  column ``index`` (B, C) and returns (z for column index + 1, cache).
  z is in ``layers.norm_dtype(dtype)`` (float32: it leaves a norm);
  velocities are float32.

  Raises (``__call__`` / ``condition``): ``ValueError`` for latents that are
  not (B, L, C) or labels not (B,); ``ConfigError`` for C != ``token_dim``.
  """
  hidden_size: int = 1024
  depth: int = 32
  num_heads: int = 16
  mlp_ratio: float = 4.0
  token_dim: int = 256
  num_classes: int = 1000
  num_cond_tokens: int = 16
  window: int = 4
  rope_base: float = 10000.0
  attn_dropout: float = 0.1
  proj_dropout: float = 0.1
  head_width: int = 1280
  head_depth: int = 12
  # The windowed kernel (``windowed_attention.IMPLS``) of forwards without
  # attention dropout; training with attn_dropout > 0 attends densely.
  attn_impl: str = "auto"
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def null_label(self) -> int:
    """The null-class label (uses ``fake_latent``): ``num_classes``."""
    return self.num_classes

  @property
  def head_dim(self) -> int:
    """Attention head width: ``hidden_size // num_heads``."""
    return self.hidden_size // self.num_heads

  def setup(self):
    d, kw = self.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = layers.default_kernel_init   # the official normal(0, 0.02)
    self.class_emb = layers.embed(self.num_classes, d, init=init, **kw)
    self.fake_latent = self.param("fake_latent",
                                  layers.named(init, (None, "embed")), (1, d),
                                  self.param_dtype)
    self.z_proj = _dense(d, (None, "embed"), None, **kw)
    self.z_proj_ln = layers.layer_norm(1e-6, **kw)
    self.encoder_pos_embed_learned = self.param(
        "encoder_pos_embed_learned", layers.named(init, (None, "pos", "embed")),
        (1, self.num_cond_tokens, d), self.param_dtype)
    block = layers.maybe_remat(Block, self.remat, static_argnums=(5,))
    self.encoder_blocks = [
        block(self.num_heads, int(d * self.mlp_ratio), self.window,
              self.attn_dropout, self.proj_dropout, self.attn_impl, **kw)
        for _ in range(self.depth)]
    self.encoder_norm = layers.layer_norm(1e-6, **kw)
    self.diffloss = DiffLoss(self.token_dim, self.head_width, self.head_depth,
                             **kw)

  # --- pieces ---------------------------------------------------------------
  def _cond_tokens(self, labels):
    """labels (B,) -> normalised condition tokens (B, M, d)."""
    emb = self.class_emb(jnp.clip(labels, 0, self.num_classes - 1))
    # float32 (as the sum with the position table gives): the fake latent's
    # gradient sums the batch's null rows.
    emb = jnp.where((labels == self.null_label)[:, None],
                    self.fake_latent.astype(jnp.float32),
                    emb.astype(jnp.float32))
    return self.z_proj_ln(emb[:, None] + self.encoder_pos_embed_learned)

  def _rope(self, positions):
    return rope_tables(positions, self.head_dim, self.rope_base)

  def _check(self, latents, labels):
    """latents (B, L, C) against the config: ValueError for another layout,
    ConfigError naming ``token_dim`` for another C."""
    if latents.ndim != 3:
      raise ValueError(f"latents must be (B, L, {self.token_dim}); got "
                       f"{latents.shape}.")
    if latents.shape[-1] != self.token_dim:
      raise ConfigError(
          f"latents have {latents.shape[-1]} channels per column (shape "
          f"{latents.shape}) but config.model.token_dim={self.token_dim}: set "
          f"config.model.token_dim={latents.shape[-1]} (the tokenizer's "
          "embed_dim, config.tokenizer.model.embed_dim) or use the tokenizer "
          "this model was configured for.")
    if labels.shape != latents.shape[:1]:
      raise ValueError(f"labels must have shape ({latents.shape[0]},), got "
                       f"{labels.shape}.")

  # --- full (teacher-forced) forward ---------------------------------------------
  def condition(self, latents, labels, train=False, shift=0):
    """Per-column conditioning vectors z (B, L, d): z[:, i] predicts column i."""
    self._check(latents, labels)
    cond = self._cond_tokens(labels)
    img = self.z_proj_ln(self.z_proj(latents))
    # Positions (L,) for a scalar shift, (B, L) for one per example.
    cos, sin = self._rope(jnp.arange(latents.shape[1]) + jnp.asarray(shift)[..., None])
    for blk in self.encoder_blocks:
      cond, img = blk(cond, img, cos, sin, train)
    x = jnp.concatenate([cond[:, -1:], img[:, :-1]], axis=1)
    return self.encoder_norm(x)

  def velocity(self, x_t, t, z):
    """Head: x_t (..., C), t (...), z (..., d) -> velocity (..., C) float32."""
    return self.diffloss(x_t, t, z).astype(jnp.float32)

  def head_modulations(self, t, z):
    """The head's adaLN modulations, which depend on (t, z) only: t (...) and
    z (..., d) broadcast together -> tuple of ``head_depth + 1`` arrays
    (..., 3 head_width) and last (..., 2 head_width) for ``head_velocity``."""
    return self.diffloss.modulations(t, z)

  def head_velocity(self, x_t, mods):
    """``velocity`` given ``head_modulations``: x_t (..., C) -> (..., C) f32."""
    return self.diffloss.modulated(x_t, mods).astype(jnp.float32)

  def __call__(self, latents, labels, noise, t, train=False, shift=0):
    z = self.condition(latents, labels, train, shift)
    b, m, n, c = noise.shape
    x = latents[:, None].astype(jnp.float32)
    tt = t[..., None]
    x_t = tt * noise + (1.0 - tt) * x
    zz = jnp.broadcast_to(z[:, None], (b, m, n, z.shape[-1]))
    return self.velocity(x_t, t, zz), z

  # --- rolling-cache synthesis ----------------------------------------------------
  def prefill(self, labels):
    """labels (B,) -> (z for column 0 (B, d), cache).

    cache["layers"][i]: ``k``/``v`` (B, window, H, hd) zeros (rolling self-
    attention cache) and ``ck``/``cv`` (B, M, H, hd) cross-attention keys and
    values of the condition tokens (constant for the whole image).
    """
    b = labels.shape[0]
    cond = self._cond_tokens(labels)
    caches = []
    # Keys and values are rounded to dtype (the projections'), so the cache
    # holds them in it, as the cross-attention's.
    k, v = empty_window_cache(b, self.window, self.num_heads, self.head_dim,
                              self.dtype)
    for blk in self.encoder_blocks:
      cond, (ck, cv) = blk.prefill(cond)
      caches.append({"k": k, "v": v, "ck": ck, "cv": cv})
    return self.encoder_norm(cond[:, -1]), {"layers": caches}

  def decode_step(self, latent, index, cache):
    """latent (B, C) of column ``index`` -> (z for column index + 1 (B, d), cache)."""
    img = self.z_proj_ln(self.z_proj(latent[:, None]))
    cos, sin = self._rope(jnp.reshape(index, (1,)))
    new = []
    for blk, c in zip(self.encoder_blocks, cache["layers"]):
      img, c = blk.step(img, cos, sin, index, c)
      new.append(c)
    return self.encoder_norm(img[:, 0]), {"layers": new}


def build(cfg) -> EqGenerator:
  """``config.model`` -> EqGenerator; unset fields take the class defaults
  (the official L model). ``seq_len`` (columns per training image) is read by
  ``example_inputs`` only. Raises ConfigError for an unknown key, a width the
  heads do not divide, an odd head dimension (RoPE) or window < 1."""
  model = EqGenerator(**models.config_fields(cfg, EqGenerator,
                                             ignore=("seq_len",)))
  layers.check_heads("config.model.num_heads", model.num_heads,
                     model.hidden_size, "config.model.hidden_size")
  if (model.hidden_size // model.num_heads) % 2:
    raise ConfigError(
        "RoPE needs an even head dimension; config.model.hidden_size / "
        f"config.model.num_heads is {model.hidden_size // model.num_heads}.")
  if model.window < 1:
    raise ConfigError(f"config.model.window={model.window} must be at least 1 "
                      "(query i attends to keys i-window+1..i).")
  return model


def example_inputs(cfg, batch_size: int = 1):
  """(latents f32 zeros (batch_size, seq_len, token_dim), labels int32 zeros
  (batch_size,), noise f32 zeros (batch_size, 1, seq_len, token_dim), t f32
  ones (batch_size, 1, seq_len)): the arguments of ``EqGenerator.__call__``."""
  n, c = cfg.get("seq_len", 16), cfg.get("token_dim", EqGenerator.token_dim)
  return (jnp.zeros((batch_size, n, c), jnp.float32),
          jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size, 1, n, c), jnp.float32),
          jnp.ones((batch_size, 1, n), jnp.float32))
