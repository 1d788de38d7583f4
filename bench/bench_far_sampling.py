"""FAR sampling throughput against the floor its weights impose.

Same method as ``bench_rar_sampling.py`` (pieces in ``sampling_floor.py``):
a *floor* measured in the same process (a bare chain of matmuls over the same
model's parameter arrays, nothing else) and the sampler, interleaved ``--repeats`` times, compile time
excluded, CFG as a doubled batch, random weights. Per raster position the
floor reads what a step must: ``aggregation_layer``, every backbone layer
(qkv, out, fc1_g, fc1_x, fc2), then for each of the k sub-tokens every head layer
and its ``output_i`` head.

Modes: ``floor``; ``floor_kv`` = the floor plus each attention layer's bare
reads of its KV cache (q.K, s.V over the filled prefix in the sampler's
chunks; the head's k-position cache too): every byte ``cached`` must read;
``cached`` = ``genvis_jax.sample.far.sample`` (``--dtype``,
``--bucket``); ``cached_full`` = the same with one chunk over the full cache
(``bucket=0``). ``--check`` compares cached with ``sample_uncached`` on a copy
of the model with a ``--check_grid`` grid (same weights); in fp32 a fraction
below 1 exits with status 1 (with ``--dtype`` it is reported only).

  python bench/bench_far_sampling.py --size=b --variant=dual --batch=8 --check
"""

from __future__ import annotations

import os
import platform
import sys

# Run as a script (`python bench/bench_far_sampling.py`): the repository root
# holds the sibling bench module imported below.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np

from bench.accel_harness import commit_id
from bench.sampling_floor import (DTYPES, aot, cache_bytes, check_args,
                                  chunked_steps, kv_stand_in, parser,
                                  print_bytes, print_floor_table, read_cache,
                                  sampler_opts, sampling_precision,
                                  time_interleaved, weight_bytes)
from genvis_jax import models
from genvis_jax.sample import ar
from genvis_jax.sample import common
from genvis_jax.sample import far as far_sample

SMALL = dict(n_layer=4, n_head_layer=2, dim=256, n_head=8, codebook_size=1024)


def model_config(size: str, variant: str, grid: int | None):
  from configs import far_common  # pylint: disable=import-outside-toplevel
  c = far_common.get_config("b" if size == "small" else size, variant).model
  if size == "small":
    c.update(SMALL)
  if grid:
    c.grid = grid
  c.dtype = c.param_dtype = "float32"
  return c


def floor_paths(model):
  """The kernels one ``floor_fn`` position multiplies (the head's k times),
  as paths into params."""
  layer = [("attention", "qkv"), ("attention", "out"), ("feed_forward", "fc1_g"),
           ("feed_forward", "fc1_x"), ("feed_forward", "fc2")]
  paths = [("aggregation_layer", "kernel")]
  paths += [(f"layers_{i}",) + n + ("kernel",) for i in range(model.n_layer)
            for n in layer]
  for i in range(model.num_codebooks):
    paths += [(f"ar_head_{j}",) + n + ("kernel",)
              for j in range(model.n_head_layer) for n in layer]
    paths.append((f"output_{i + 1}", "kernel"))
  return paths


def byte_counts(model, params, rows: int, dtype=None,
                bucket: int | None = None) -> tuple[float, float, float]:
  """Per position: bytes ``floor`` reads, weight bytes and mean KV-cache
  bytes (backbone over the sampler's chunks + the head's k-slot cache, read
  whole by each of the k sub-tokens) an exact cached position at ``rows``
  rows reads."""
  item = jnp.dtype(dtype or jnp.float32).itemsize
  weights = weight_bytes(params, floor_paths(model), item)
  k = model.num_codebooks   # each sub-token reads the whole k-slot head cache
  head = 2 * k * k * model.n_head_layer * rows * model.dim * item
  backbone = cache_bytes(model.n_layer, rows, model.dim, item, model.seq_len,
                         1, bucket)
  return weights, weights, head + backbone


def floor_fn(model, positions: int, rows: int, dtype=None, with_kv: bool = False,
             bucket: int | None = None):
  """Jitted ``f(params, kv) -> x``: per position one dependent matmul chain
  over the aggregation, backbone, head and output weights at ``rows`` rows.
  ``with_kv`` adds every backbone layer's bare cache reads over ``kv``
  (``kv_stand_in``, one per backbone layer) in the sampler's chunks
  (``bucket``), and every head layer's over a k-position stand-in."""
  d, k = model.dim, model.num_codebooks
  bucket = ar.DEFAULT_BUCKET if bucket is None else bucket

  def layer(x, p, kv=None):
    a, f = p["attention"], p["feed_forward"]
    h = (x @ a["qkv"]["kernel"])[:, :d]
    if kv is not None:
      h = h + read_cache(h, kv)
    x = x + h @ a["out"]["kernel"]
    h = (x @ f["fc1_g"]["kernel"]) * (x @ f["fc1_x"]["kernel"])
    return x + h @ f["fc2"]["kernel"]

  def run(params, kv):
    params = common.cast_params(params, dtype)
    back = [params[f"layers_{i}"] for i in range(model.n_layer)]
    head = [params[f"ar_head_{i}"] for i in range(model.n_head_layer)]
    agg = params["aggregation_layer"]["kernel"]
    x0 = jnp.ones((rows, d), agg.dtype) * 1e-3
    head_kv = (None if not with_kv else kv_stand_in(
        1, rows, model.n_head, d // model.n_head, k, agg.dtype)[0])

    def step(cache):
      def body(_, x):
        x = jnp.tile(x, (1, k)) @ agg
        for i, p in enumerate(back):
          x = layer(x, p, None if cache is None else cache[i])
        for i in range(k):
          for p in head:
            x = layer(x, p, head_kv)
          x = x + (x @ params[f"output_{i + 1}"]["kernel"])[:, :d]
        return x
      return body
    return chunked_steps(step, x0, positions, kv if with_kv else None, 1,
                         bucket)
  return jax.jit(run)


MODES = ("floor", "floor_kv", "cached", "cached_full")


def main():
  p = parser(__doc__)
  p.add_argument("--size", default="small", choices=["small", "b", "l"])
  p.add_argument("--variant", default="dual", choices=["dual", "triple"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--grid", type=int, default=None, help="default: the config's")
  p.add_argument("--modes", default="floor,cached",
                 help=f"comma-separated, of: {', '.join(MODES)}")
  p.add_argument("--repeats", type=int, default=2, help="timed runs per mode")
  p.add_argument("--dtype", default="float32", choices=DTYPES)
  p.add_argument("--bucket", type=int, default=None)
  p.add_argument("--check", action="store_true",
                 help="also compare the cached sampler with the uncached one")
  p.add_argument("--check_grid", type=int, default=4)
  args = p.parse_args()
  from configs import far_common  # pylint: disable=import-outside-toplevel
  precision = sampling_precision(far_common.get_config(
      "b" if args.size == "small" else args.size, args.variant))
  check_args(p, args, MODES)

  cfg = model_config(args.size, args.variant, args.grid)
  model = models.build(cfg)
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  # Random leaves without compiling init; the zero-initialised output heads
  # get values so sampling is not uniform.
  params = jax.jit(lambda: jax.tree_util.tree_map(
      lambda s: 0.02 * jnp.sin(jnp.arange(s.size, dtype=s.dtype).reshape(s.shape)
                               * 0.37) + (1.0 if s.ndim == 1 else 0.0),
      shapes))()
  n_params = models.count_params(params) / 1e6
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  key = jax.random.key(1)
  g, temp = 2.0, 1.0
  dtype = None if args.dtype == "float32" else args.dtype
  rows, positions = 2 * args.batch, model.seq_len
  dev = jax.devices()[0]
  print(f"# FAR sampling | size={args.size}:{args.variant} ({n_params:.1f}M "
        f"params) batch={args.batch} (x2 CFG = {rows} rows) positions="
        f"{positions} x k={model.num_codebooks} dtype={args.dtype} "
        f"bucket={args.bucket} matmuls {precision} | "
        f"{dev.platform}:{getattr(dev, 'device_kind', '')} "
        f"{platform.processor() or platform.machine()} jax {jax.__version__} "
        f"| commit {commit_id()}", flush=True)

  runs, compile_s = {}, {}
  for mode in args.modes.split(","):
    if mode in ("floor", "floor_kv"):
      kv = kv_stand_in(model.n_layer, rows, model.n_head,
                       model.dim // model.n_head, positions + 1,
                       dtype) if mode == "floor_kv" else None
      c, f = aot(floor_fn(model, positions, rows, dtype, kv is not None,
                          args.bucket), params, kv)
    elif mode in ("cached", "cached_full"):
      fn = far_sample.sampler_fn(
          model, cached=True, use_cfg=True, **sampler_opts(
              dtype, 0 if mode == "cached_full" else args.bucket))
      c, f = aot(fn, params, labels, key, jnp.float32(g), jnp.float32(temp))
    else:
      raise ValueError(f"Unknown mode {mode!r}; use floor, floor_kv, cached, "
                       "cached_full.")
    runs[mode], compile_s[mode] = f, c
    print(f"compiled {mode} in {c:.1f} s", flush=True)

  times, outs = time_interleaved(runs, args.repeats)
  print_floor_table(times, compile_s, "position", positions, args.batch)
  print_bytes(*byte_counts(model, params, rows, dtype, args.bucket),
              "position")

  if args.check:
    kw = dict(guidance_scale=g, temperature=temp)
    if dtype is not None and "cached" in outs:
      fp32 = far_sample.sample(model, params, labels, key, bucket=args.bucket,
                               **kw)
      same = float(np.mean(np.asarray(outs["cached"]) == np.asarray(fp32)))
      print(f"check: {args.dtype} cached == float32 cached in {same:.4f} of "
            "codes")
    sub = model.clone(grid=args.check_grid)
    ours = far_sample.sample(sub, params, labels, key, dtype=dtype, bucket=8,
                             **kw)
    ref = far_sample.sample_uncached(sub, params, labels, key, **kw)
    frac = float(np.mean(np.asarray(ours) == np.asarray(ref)))
    print(f"check: cached == sample_uncached (grid {args.check_grid}, bucket 8)"
          f" in {frac:.4f} of codes")
    if dtype is None and frac < 1.0:
      sys.exit("check failed: fp32 cached sampling differs from "
               "sample_uncached")


if __name__ == "__main__":
  main()
