"""Benchmark ultra-long equivariant synthesis: rolling KV cache vs full recompute.

Generates images 1x, 2x, 4x, 8x the training width column by column and
prints the time per generated column for the cached sampler
(``genvis_jax.sample.eq_generator.sample``: per-layer rolling cache of ``window``
positions) and for the official algorithm (``sample_uncached``: the whole
windowed forward re-run for every column). The cached time per column stays
flat; the full recompute grows with the width. Timings exclude compilation
(one warm-up call per case) and are the median of ``--iters`` runs.

  python bench/bench_eq_long.py                    # tiny random model, CPU < 1 min
  python bench/bench_eq_long.py --size=l --num_steps=100 --batch=8   # paper L
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# `python bench/bench_eq_long.py` from the repo root: make `configs` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import eq_common
from genvis_jax import models
from genvis_jax.sample import eq_generator as eq_sample

TINY = dict(hidden_size=64, depth=4, num_heads=4, head_width=64, head_depth=3,
            token_dim=16, num_classes=10, num_cond_tokens=16, window=4,
            seq_len=16, attn_dropout=0.0, proj_dropout=0.0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="tiny", choices=["tiny", *eq_common.SIZES])
  p.add_argument("--train_columns", type=int, default=16,
                 help="training width in columns (16 = 256 px)")
  p.add_argument("--multiples", default="1,2,4,8")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--num_steps", type=int, default=10,
                 help="Euler steps of the flow head per column (paper: 100)")
  p.add_argument("--cfg", type=float, default=3.0)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--skip_full_above", type=int, default=1 << 30,
                 help="skip full recompute beyond this many columns")
  return p.parse_args(argv)


def model_config(size: str) -> ml_collections.ConfigDict:
  if size == "tiny":
    return eq_common.generator_model("s", **TINY)
  return eq_common.generator_model(size)


def random_params(cfg, seed=0):
  """Random weights with signal in the zero-initialised head layers."""
  abstract = jax.eval_shape(lambda k: models.init_params(cfg, k),
                            jax.random.key(0))
  leaves, tdef = jax.tree_util.tree_flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, a.shape, a.dtype) * 0.02 for k, a in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tdef, out)


def time_call(fn, iters):
  jax.block_until_ready(fn())            # compile + warm-up
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def cache_bytes(model, params, batch):
  _, cache = jax.eval_shape(
      lambda p, lab: model.apply({"params": p}, lab, method="prefill"),
      params, jnp.zeros((batch,), jnp.int32))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(cache))


def run(args):
  cfg = model_config(args.size)
  model = models.build(cfg)
  params = random_params(cfg)
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  rng = jax.random.key(1)
  b2 = args.batch * (2 if args.cfg != 1.0 else 1)
  print(f"# device={jax.devices()[0].platform} size={args.size} "
        f"params={models.count_params(params) / 1e6:.1f}M batch={args.batch} "
        f"cfg={args.cfg} head_steps={args.num_steps} window={cfg.window} "
        f"cache={cache_bytes(model, params, b2) / 2**10:.0f} KiB (any width)")
  print(f"{'width':>6} {'columns':>8} {'pixels':>7} {'cached ms/col':>14} "
        f"{'full ms/col':>12} {'speedup':>8}")
  rows = []
  for m in (int(x) for x in args.multiples.split(",")):
    n = m * args.train_columns
    kw = dict(num_columns=n, guidance_scale=args.cfg, num_steps=args.num_steps)
    cached = time_call(lambda: eq_sample.sample(model, params, labels, rng, **kw),
                       args.iters) / n * 1e3
    full = float("nan")
    if n <= args.skip_full_above:
      full = time_call(
          lambda: eq_sample.sample_uncached(model, params, labels, rng, **kw),
          args.iters) / n * 1e3
    rows.append((m, n, cached, full))
    print(f"{m:>5}x {n:>8} {16 * n:>7} {cached:>14.2f} {full:>12.2f} "
          f"{full / cached:>7.1f}x", flush=True)
  return rows


if __name__ == "__main__":
  run(parse_args())
