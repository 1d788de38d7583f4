"""Windowed causal self-attention over columns (Equivariant image modeling).

``windowed_causal_attention(q, k, v, window=W, tokens_per_column=T)`` with
``q, k, v`` of shape ``(batch, seq, heads, head_dim)``: query token ``i``
(column ``i // T``) attends key ``j`` iff its column is one of the ``W``
columns ending at its own (all tokens of the current column included). The
official generator (one token per column, ``cond_length=3``) is
``window=4, tokens_per_column=1``; see ``reference.py`` for the exact rule.

Implementations (``impl``):
  * ``"pallas_tpu"``: Pallas Mosaic kernels (``pallas_tpu.py``),
  * ``"pallas_gpu"``: Pallas Triton kernels (``pallas_gpu.py``),
  * ``"reference"``: blocked O(N x W) XLA version (``banded_attention``),
  * ``"dense"``: O(N^2) masked XLA attention (for comparison),
  * ``"auto"``: the Pallas kernel of the default backend, else ``reference``.
All are differentiable; the Pallas ones through ``jax.custom_vjp`` with Pallas
backward kernels. Off their own platform the Pallas kernels run in interpret
mode (``interpret=None`` picks that), which is how the CPU tests run them.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from genvis_jax.core import sharding
from genvis_jax.errors import ConfigError
from genvis_jax.kernels.windowed_attention.reference import (
    banded_attention, dense_attention, window_mask)

IMPLS = ("auto", "reference", "dense", "pallas_tpu", "pallas_gpu")
DEFAULT_BLOCKS = {"pallas_tpu": (128, 128), "pallas_gpu": (64, 64)}

__all__ = ["windowed_causal_attention", "resolve_impl", "check_impl",
           "banded_attention", "dense_attention", "window_mask", "IMPLS"]


def check_impl(impl) -> None:
  """Raises ``ConfigError`` naming ``config.model.attn_impl`` (the setting
  models take ``impl`` from) unless ``impl`` is one of ``IMPLS``."""
  if impl not in IMPLS:
    raise ConfigError(f"config.model.attn_impl={impl!r} (the windowed "
                      f"attention's impl) is not one of {IMPLS}.")


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
  """The implementation ``impl`` stands for on ``backend`` (default: jax's).
  Raises ``ConfigError`` (``check_impl``) for an unknown ``impl``."""
  check_impl(impl)
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend, "reference")


def _check(q, k, v, window, tokens_per_column):
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(
        "q, k, v must share one shape (batch, seq, heads, head_dim); got "
        f"{q.shape}, {k.shape}, {v.shape}. Split heads before calling.")
  t = tokens_per_column
  if not isinstance(t, int) or t < 1:
    raise ValueError(f"tokens_per_column must be an int >= 1, got {t!r}.")
  if q.shape[1] % t:
    raise ValueError(
        f"seq={q.shape[1]} is not a whole number of columns of "
        f"tokens_per_column={t}; pass whole columns.")
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(
        f"window must be an int >= 1 (columns, current one included) or None "
        f"(full causal), got {window!r}.")


def _blocks(impl, n, block_q, block_k):
  dq, dk = DEFAULT_BLOCKS[impl]
  bq, bk = block_q or dq, block_k or dk
  if impl == "pallas_gpu" and not all(x >= 16 and x & (x - 1) == 0
                                      for x in (bq, bk)):
    raise ValueError(f"pallas_gpu needs power-of-two blocks >= 16 (Triton "
                     f"dot), got block_q={bq}, block_k={bk}.")
  if impl == "pallas_tpu" and (bq % 8 or bk % 8 or min(bq, bk) < 8):
    raise ValueError(f"pallas_tpu needs blocks that are multiples of 8 "
                     f"(Mosaic tiling; 128 is fastest), got block_q={bq}, "
                     f"block_k={bk}.")
  # A block longer than the (rounded) sequence would be pure padding.
  if impl == "pallas_gpu":
    cap = max(16, _next_pow2(n))
  else:
    cap = -(-n // 8) * 8
  capped = min(bq, cap), min(bk, cap)
  if capped != (bq, bk) and capped[0] != capped[1]:
    # One tile cut to the sequence: the sequence is padded to the tiles'
    # lcm, which for a cut tile (104 beside 64) is many times the sequence
    # (832 for 100 tokens). Rounding the cut tile up to a multiple of the
    # other keeps the padded length under the sequence plus one tile.
    small, big = sorted(capped)
    big = -(-big // small) * small
    capped = (big, small) if capped[0] > capped[1] else (small, big)
  return capped


def _layout(impl, n, block_q, block_k) -> tuple[int, int, int]:
  """(block_q, block_k, padded sequence length) of a Pallas kernel for ``n``
  tokens: the tiles of ``_blocks`` and ``n`` rounded up to their lcm."""
  bq, bk = _blocks(impl, n, block_q, block_k)
  span = math.lcm(bq, bk)
  return bq, bk, -(-n // span) * span


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _pad_seq(x, n_pad, axis):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n_pad - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _pallas_attention(kernel, q, k, v, g):
  """Differentiable attention of a Pallas kernel module (``pallas_tpu`` /
  ``pallas_gpu``) on its padded layout: ``kernel.forward(q, k, v, g) ->
  (out, lse)`` and ``kernel.backward(q, k, v, out, lse, do, g) -> (dq, dk,
  dv)``; g is the module's static ``Geometry``."""
  return kernel.forward(q, k, v, g)[0]


def _pallas_attention_fwd(kernel, q, k, v, g):
  out, lse = kernel.forward(q, k, v, g)
  return out, (q, k, v, out, lse)


def _pallas_attention_bwd(kernel, g, res, do):
  return kernel.backward(*res, do, g)


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


def windowed_causal_attention(q, k, v, *, window: int | None,
                              tokens_per_column: int = 1,
                              scale: float | None = None, impl: str = "auto",
                              block_q: int | None = None,
                              block_k: int | None = None, interpret=None):
  """Windowed causal attention. q, k, v: (B, N, H, D) -> (B, N, H, D) in
  ``q.dtype`` (softmax statistics and accumulation in float32).

  Args:
    window: visible columns per query, its own included (``None``: all
      previous columns, i.e. causal over columns).
    tokens_per_column: tokens per column ``T``; ``N`` must be a multiple.
    scale: logit scale, default ``1 / sqrt(D)``; a Python number (static:
      it is part of the kernel's geometry), not a traced value.
    impl: one of ``IMPLS``.
    block_q, block_k: Pallas tile sizes (defaults TPU 128/128, GPU 64/64,
      capped by ``N``); for ``reference`` ``block_q`` is the query chunk.
    interpret: Pallas interpret mode; ``None`` = on when not on the kernel's
      platform (e.g. CPU tests). ``pallas_tpu`` also takes
      ``pltpu.InterpretParams()``; ``pallas_gpu`` a bool only.
  Raises:
    ValueError: q, k, v not of one 4-D shape; ``tokens_per_column`` not an
      int >= 1 or not dividing N; ``window`` neither None nor an int >= 1;
      tile sizes the chosen Pallas kernel cannot use (GPU: powers of two
      >= 16; TPU: multiples of 8); ``interpret`` neither None nor a bool
      for ``pallas_gpu``.
    ConfigError: ``impl`` is not one of ``IMPLS`` (names
      config.model.attn_impl).
  """
  _check(q, k, v, window, tokens_per_column)
  b, n, h, d = q.shape
  t = tokens_per_column
  window = n // t if window is None else min(window, n // t)
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  impl = resolve_impl(impl)
  kw = dict(window=window, tokens_per_column=t, scale=scale)
  if impl == "dense":
    return dense_attention(q, k, v, **kw)
  if impl == "reference":
    return banded_attention(q, k, v, chunk=block_q, **kw)

  bq, bk, n_pad = _layout(impl, n, block_q, block_k)
  backend = jax.default_backend()
  geom = dict(window=window, tokens_per_column=t, block_q=bq, block_k=bk,
              padded_len=n_pad, scale=scale)
  if impl == "pallas_tpu":
    from genvis_jax.kernels.windowed_attention import pallas_tpu
    g = pallas_tpu.Geometry(
        **geom, interpret=(backend != "tpu") if interpret is None else interpret)

    def run(q, k, v):
      to_kernel = lambda x: _pad_seq(x, n_pad, 1).transpose(0, 2, 1, 3)
      out = _pallas_attention(pallas_tpu, *(to_kernel(x) for x in (q, k, v)), g)
      return out.transpose(0, 2, 1, 3)[:, :n]
    return _per_shard(run, q, k, v)

  from genvis_jax.kernels.windowed_attention import pallas_gpu
  if interpret is not None and not isinstance(interpret, bool):
    # Triton's interpreter takes a bool; Mosaic's InterpretParams would fail
    # deep inside jax with a bare AssertionError.
    raise ValueError(f"pallas_gpu takes interpret=None, True or False, got "
                     f"{interpret!r} (InterpretParams are pallas_tpu's).")
  g = pallas_gpu.Geometry(
      **geom, interpret=(backend != "gpu") if interpret is None else interpret)
  d_pad = _next_pow2(d)  # Triton tiles need power-of-two sizes

  def run(q, k, v):
    to_kernel = lambda x: _pad_seq(_pad_seq(x, n_pad, 1), d_pad, 3)
    out = _pallas_attention(pallas_gpu, *(to_kernel(x) for x in (q, k, v)), g)
    return out[:, :n, :, :d]
  return _per_shard(run, q, k, v)


def kernel_spec(shape, mesh) -> P:
  """How a Pallas call's (B, N, H, D) operands are split over ``mesh``:
  logical axes ("batch", -, "act_heads", -) through the context's rules
  table, each mesh axis kept only where it divides; the sequence and
  head_dim stay whole (every query needs its window of keys).

  The trainer traces under ``nn.logical_axis_rules(config.sharding.rules)``,
  so a run's edited table applies here too. Without a rules context (a
  model traced under ``jax.set_mesh`` alone; the samplers set no mesh) the
  package's one table, ``sharding.DEFAULT_RULES``, applies, as in
  ``sharding.batch_axes``: the kernel still runs per device, split as a
  default config's run splits it, rather than on a gathered batch.
  """
  rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
  # Flax gives each mesh axis to one dimension at most (a table may give the
  # batch every axis, tensor included).
  spec = nn.logical_to_mesh_axes(("batch", None, "act_heads", None),
                                 sharding.rules_tuple(rules))
  return sharding.fit_spec(spec, shape, mesh)


def _per_shard(run, q, k, v):
  """``run(q, k, v)``, a Pallas call, on each device's shard under the
  context mesh (``jax.set_mesh``, as the trainer traces). XLA cannot
  partition a Pallas custom call: left to GSPMD it gathers the whole batch
  onto every device and runs the kernel on all of it; under ``shard_map``
  each device runs its own rows (maxtext does the same for its attention
  kernels)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q, k, v)
  spec = kernel_spec(q.shape, mesh)
  if all(axes is None for axes in spec):
    return run(q, k, v)
  return jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(q, k, v)
