"""The KV-cache decode loop shared by the autoregressive samplers (RAR, FAR).

A sampler supplies the model-specific parts: ``prefill`` (fills the cache with
the condition and draws the codes of step 0), ``step`` (feeds the codes of step
t - 1, runs the cached model and turns logits into the k codes of step t) and
optionally ``chunk_setup`` (constants computed once per chunk of steps, e.g.
RAR's adaLN modulation tables). This module owns what the token samplers
share beyond ``genvis_jax.sample.common`` (CFG rows, dtype, compiled
programs, label checks, which the flow sampler uses too):

* the categorical draw (``draw``: guided, tempered, ``top_k_top_p``-filtered);
* the loop itself, one jitted program: a ``fori_loop`` per *chunk* of steps.
  Inside a chunk the cache is only as long as the chunk's last step needs
  (``kv_len``, a static multiple of ``bucket``), so attention reads the filled
  prefix instead of the whole sequence; between chunks the cache is padded
  once (``resize``). ``bucket=0`` runs one chunk over the full cache. Each
  chunk compiles its own loop body, so fewer, longer chunks compile faster.
  ``Options`` / ``options`` add ``bucket`` to the common static options.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from genvis_jax.models.layers.attention import resize_kv_cache
from genvis_jax.sample import common

# kv_len granularity of the decode chunks (0 = one chunk over the full cache).
# A step reads on average half a bucket of cache it does not need; each chunk
# compiles its own loop body. RAR-B, 256 tokens, batch 8 + CFG on CPU: 32 is
# 1.10x faster than 64 (13.2 vs 14.5 s, same run) for 2x the compile (31 vs 14 s).
DEFAULT_BUCKET = 32


def top_k_top_p(logits, top_k: int = 0, top_p: float = 1.0):
  """Masks logits (B, V) outside the top-k / nucleus to -inf (0 / 1.0 = off).

  Nucleus as in the official filter (LlamaGen ``top_k_top_p_filtering``):
  keep the most probable tokens up to and including the first whose
  cumulative probability exceeds ``top_p``.
  """
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = jnp.concatenate(
        [jnp.zeros_like(cum[..., :1], bool), cum[..., :-1] > top_p], axis=-1)
    # Back to vocabulary order by a scatter (a second argsort would sort the
    # vocabulary again at every step).
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove).at[rows, order].set(remove,
                                                        unique_indices=True)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def draw(logits, key, scale, temperature, use_cfg: bool, top_k: int = 0,
         top_p: float = 1.0):
  """One categorical draw per example from (B, V) logits, or (2B, V) in
  ``common.cfg_labels`` order under CFG: guided with ``scale``
  (``common.guide``, fp32), divided by ``temperature`` (relative to the
  row's largest logit, so a tiny temperature draws the argmax), then filtered
  (``top_k_top_p``), the official order of both samplers. Returns int32
  (B,): -1 for an example whose logits hold NaN or +Inf (damaged or
  diverged weights, an overflowing dtype), or NaN once guided (-Inf in the
  unconditional half, which guidance cannot combine), where a draw would
  give a code as if nothing were wrong; the sampling driver refuses a batch
  holding one (``NonFiniteSamplesError``). A -Inf conditional logit (a
  masked code) draws as usual."""
  # Per row of the model's output, then per example once guided.
  broken = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
  if use_cfg:
    broken = broken.reshape(-1, 2).any(-1)
  logits = common.guide(logits, scale, use_cfg)
  broken |= jnp.any(jnp.isnan(logits), axis=-1)
  # Relative to each row's largest logit before the division: the same
  # distribution, and a tiny temperature gives the argmax (logits / 1e-38
  # overflowed to several +Inf, drawn as the lowest such code).
  top = jnp.max(logits, axis=-1, keepdims=True)
  logits = (logits - jnp.where(jnp.isfinite(top), top, 0.0)) / temperature
  codes = jax.random.categorical(key, top_k_top_p(logits, top_k, top_p))
  return jnp.where(broken, -1, codes).astype(jnp.int32)


def kv_chunks(num_steps: int, pos_offset: int, bucket: int):
  """Static chunks ``[(start, stop, kv_len)]`` covering steps 1..num_steps-1.

  Step t writes cache position ``t - 1 + pos_offset`` and attends to every
  position up to it, so a chunk ending at ``stop`` needs ``kv_len = stop - 1 +
  pos_offset``; chunk boundaries put kv_len at multiples of ``bucket``
  (``bucket <= 0``: one chunk); a tail shorter than half a bucket joins the
  last chunk (each chunk compiles its own loop body).
  """
  need = num_steps - 1 + pos_offset
  if num_steps <= 1:
    return []
  if bucket <= 0:
    return [(1, num_steps, need)]
  out, start = [], 1
  kv = bucket
  while start < num_steps:
    kv = max(kv, start + pos_offset)           # at least this chunk's first step
    if need - kv < bucket // 2:                # no extra body for a short tail
      kv = need
    stop = min(num_steps, kv + 1 - pos_offset)
    if stop <= start:   # a chunk that covers no step would loop forever
      raise AssertionError(f"kv_chunks({num_steps}, {pos_offset}, {bucket}) "
                           f"stalled at step {start} (kv_len {kv})")
    out.append((start, stop, min(kv, need)))
    start, kv = stop, kv + bucket
  return out


def after(labels, codes):
  """``labels`` (B,), made to depend on ``codes`` (B, k, N) drawn so far
  (>= -1), row by row (no exchange between the devices of a split batch):
  work computed from weights and labels alone (a decode chunk's modulation
  tables) is otherwise scheduled before the first loop, every chunk's at
  once, all live together (RAR-B, 32 classes per device: 1.2 GiB of
  temporaries more). A select on a value the codes never take: XLA cannot
  tell, and computes what follows from ``labels`` after ``codes`` (XLA:CPU
  removes an optimization barrier before it schedules)."""
  never = codes[:, 0, 0] == jnp.iinfo(codes.dtype).min
  return jnp.where(never, jnp.zeros_like(labels), labels)


def decode(prefill: Callable[[], tuple[Any, jax.Array]],
           step: Callable[..., tuple[Any, jax.Array]], *, num_steps: int,
           pos_offset: int, bucket: int = 0,
           chunk_setup: Callable[[int, int, jax.Array], Any] | None = None,
           resize: Callable[[Any, int], Any] = resize_kv_cache):
  """Runs the cached decode loop (call inside ``jit``).

  Args:
    prefill: ``() -> (cache, codes)``, codes int32 (B, k, num_steps) with
      step 0 filled.
    step: ``(cache, ctx, prev, t) -> (cache, z)``: prev int32 (B, k) codes of
      step t - 1 (the caller doubles them for CFG), t traced; z int32 (B, k).
    num_steps: steps (positions) to generate.
    pos_offset: cache position written by step 1 (RAR 2, FAR 1).
    bucket: kv_len granularity of the chunks (0 = one chunk, full cache).
    chunk_setup: ``(start, stop, codes) -> ctx`` computed once per chunk
      (static ints; ``codes``: those the loop before this chunk's started
      from, for a setup made to wait for them with ``after``); None passes
      ``ctx=None``.
    resize: ``(cache, kv_len) -> cache`` fitting the cache to a chunk.
  Returns:
    int32 (B, k, num_steps) codes.
  """
  cache, codes = prefill()
  ahead = codes   # the codes a chunk's setup waits for: the loop before last
  for start, stop, kv_len in kv_chunks(num_steps, pos_offset, bucket):
    # Chunk i's setup may run beside loop i - 1 (overlapping it), not
    # before: two chunks' contexts live at a time, not every chunk's.
    ctx = None if chunk_setup is None else chunk_setup(start, stop, ahead)
    ahead = codes
    cache = resize(cache, kv_len)

    def body(t, carry, ctx=ctx):
      cache, codes = carry
      prev = jax.lax.dynamic_index_in_dim(codes, t - 1, axis=2, keepdims=False)
      cache, z = step(cache, ctx, prev, t)
      return cache, jax.lax.dynamic_update_index_in_dim(codes, z, t, axis=2)

    cache, codes = jax.lax.fori_loop(start, stop, body, (cache, codes))
  return codes


@dataclasses.dataclass(frozen=True)
class Options(common.Options):
  """``common.Options`` + bucket: ``decode`` chunking (cached only; 0 for
  the reference). A token sampler subclasses it for its own static
  options."""
  bucket: int = 0


def options(cls=Options, *, cached: bool, use_cfg: bool, dtype=None,
            bucket: int | None = None, **fields):
  """``common.options`` with ``bucket`` (default ``DEFAULT_BUCKET``), which
  like dtype applies to the cached decoder only: every reference call
  shares one compiled program. Raises ``ConfigError`` for a dtype
  ``common.check_dtype`` rejects."""
  if cached:
    fields["bucket"] = DEFAULT_BUCKET if bucket is None else int(bucket)
  return common.options(cls, cached=cached, use_cfg=use_cfg, dtype=dtype,
                        **fields)
