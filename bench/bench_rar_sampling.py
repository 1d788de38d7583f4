"""RAR sampling throughput against the floor its weights impose.

At small batch a KV-cached decode step is bound by reading the weights, so
the sampler is held to a *floor* measured in the same process: a bare chain of
matmuls over the same model's parameter arrays, one chain per step, nothing
else (no attention, norms, sampling). Modes (CFG = a doubled batch, random
weights, compile time excluded, modes interleaved ``--repeats`` times so the
ratios compare like with like on a shared machine):

  floor       per step and block: qkv, out, fc1, fc2 and the adaLN matmul at
              2B rows, then lm_head (what a straightforward step must read).
  floor_noada the same without the adaLN matmul (what ``cached`` reads per
              step: its modulation comes from a per-chunk table).
  floor_kv    floor_noada plus, per layer, the bare reads of the KV cache
              (q.K, s.V; no softmax) over the filled prefix in the sampler's
              chunks: every byte ``cached`` must read per step.
  cached      ``genvis_jax.sample.rar.sample`` (``--dtype``, ``--bucket``);
              ``cached_bN`` the same with bucket N (to compare buckets in one run).
  reference   the plain KV-cache loop over ``prefill`` / ``decode_step`` (full
              cache, modulation recomputed every step), jitted as one loop.
  full        ``sample_uncached``: every step runs all L + 2 positions.
  prefix      the official no-cache loop: every step re-runs the growing
              prefix (Python loop, prefix padded to a multiple of --prefix_bucket).

``--check`` compares ``cached`` with ``reference`` token for token (same
key), and on a copy of the model cut to ``--check_tokens`` tokens (same
weights) with ``sample_uncached``; in fp32 a fraction below 1 exits with
status 1 (with ``--dtype`` the fractions are reported only).

  python bench/bench_rar_sampling.py --size=b --batch=8 --modes=floor,cached --check
  python bench/bench_rar_sampling.py --size=small --batch=4 --modes=cached,full,prefix
"""

from __future__ import annotations

import os
import platform
import sys
import time

# Run as a script from anywhere: the repository root is where ``bench`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import sampling_floor as floor
from bench.accel_harness import commit_id
from genvis_jax import models
from genvis_jax.models.rar import PREFIX
from genvis_jax.sample import ar
from genvis_jax.sample import common
from genvis_jax.sample import rar as rar_sample

SMALL = dict(depth=6, hidden_size=256, num_heads=8, mlp_dim=1024)


def model_config(size: str, tokens: int, dtype: str = "float32"):
  if size == "small":
    c = ml_collections.ConfigDict(dict(name="rar", codebook_size=1024,
                                       num_classes=1000, **SMALL))
  else:
    from configs import rar_common  # pylint: disable=import-outside-toplevel
    c = rar_common.get_config(size).model
  c.seq_len = tokens
  c.dtype = dtype
  c.param_dtype = "float32"
  return c


def floor_paths(model, adaln: bool):
  """The kernels one ``floor_fn`` step multiplies, as paths into params
  (``adaln``: each block's modulation and the head's)."""
  names = [("attn", "qkv"), ("attn", "out"), ("mlp", "fc1"), ("mlp", "fc2")]
  names += [("adaLN_modulation",)] if adaln else []
  head = [("adaln_before_head", "adaLN_modulation", "kernel")] if adaln else []
  return [(f"blocks_{i}",) + n + ("kernel",) for i in range(model.depth)
          for n in names] + head + [("lm_head", "kernel")]


def byte_counts(model, params, rows: int, dtype=None,
                bucket: int | None = None) -> tuple[float, float, float]:
  """Per step of ``model.seq_len`` (mean): bytes ``floor`` reads, and the
  weight and KV-cache bytes an exact cached step at ``rows`` rows (CFG:
  rows / 2 classes + the null class) reads. A chunk whose modulation table
  exceeds ``rar_sample.TABLE_BYTES`` computes each step's modulation from
  the adaLN weights instead, so its steps read those too."""
  item = jnp.dtype(dtype or jnp.float32).itemsize
  bucket = ar.DEFAULT_BUCKET if bucket is None else bucket
  steps = model.seq_len
  adaln = [(f"blocks_{i}", "adaLN_modulation", "kernel")
           for i in range(model.depth)]
  adaln.append(("adaln_before_head", "adaLN_modulation", "kernel"))
  per_step = sum(stop - start for start, stop, _ in ar.kv_chunks(
      steps, PREFIX, bucket) if rar_sample.table_bytes(
          model, rows // 2 + 1, stop - start, dtype) > rar_sample.TABLE_BYTES)
  weights = (floor.weight_bytes(params, floor_paths(model, False), item)
             + floor.weight_bytes(params, adaln, item) * per_step / steps)
  return (floor.weight_bytes(params, floor_paths(model, True), item), weights,
          floor.cache_bytes(model.depth, rows, model.hidden_size, item, steps,
                      PREFIX, bucket))


def floor_fn(model, steps: int, rows: int, adaln: bool, dtype=None,
             with_kv: bool = False, bucket: int | None = None):
  """Jitted ``f(params, kv) -> x``: ``steps`` dependent matmul chains over
  the block weights (``adaln``: with the blocks' and the head's modulation)
  and lm_head at ``rows`` rows; the weights are cast to
  ``dtype`` once before the loop, as the sampler does. ``with_kv`` adds each
  layer's bare cache reads (``floor.read_cache``) over ``kv``
  (``floor.kv_stand_in``) in the sampler's chunks (``bucket``); otherwise
  ``kv`` is ignored."""
  d = model.hidden_size
  bucket = ar.DEFAULT_BUCKET if bucket is None else bucket

  def run(params, kv):
    params = common.cast_params(params, dtype)
    blocks = [params[f"blocks_{i}"] for i in range(model.depth)]
    head = params["lm_head"]["kernel"]
    x0 = jnp.ones((rows, d), head.dtype) * 1e-3

    def step(cache):
      def body(_, x):
        for i, blk in enumerate(blocks):
          h = x @ blk["attn"]["qkv"]["kernel"]
          if cache is not None:
            h = h[:, :d] + floor.read_cache(h[:, :d], cache[i])
          x = x + h[:, :d] @ blk["attn"]["out"]["kernel"]
          h = x @ blk["mlp"]["fc1"]["kernel"]
          x = x + h @ blk["mlp"]["fc2"]["kernel"]
          if adaln:
            x = x + (x @ blk["adaLN_modulation"]["kernel"])[:, :d]
        if adaln:
          x = x + (x @ params["adaln_before_head"]["adaLN_modulation"][
              "kernel"])[:, :d]
        logits = x @ head                       # (rows, V); V may be < d
        reps = -(-d // logits.shape[1])
        return x + jnp.tile(logits, (1, reps))[:, :d]
      return body
    return floor.chunked_steps(step, x0, steps, kv if with_kv else None,
                               PREFIX, bucket)
  return jax.jit(run)


def reference_fn(model, seq_len: int, use_cfg: bool):
  """The plain KV-cache loop over ``prefill`` / ``decode_step`` as one jit."""
  def run(params, labels, rng, g, pw, temp):
    b = labels.shape[0]
    labels2 = common.batch_labels(labels, model.null_label, use_cfg)
    draw = lambda lg, t: rar_sample.pick(
        lg, t, rng, model.seq_len, g, pw, temp, use_cfg)
    logits, state = model.apply({"params": params}, labels2, method="prefill",
                                mutable=["cache"])
    tokens = jnp.zeros((b, seq_len), jnp.int32).at[:, 0].set(draw(logits, 0))

    def body(t, carry):
      cache, tokens = carry
      prev = common.twice(tokens[:, t - 1], use_cfg)
      logits, state = model.apply({"params": params, "cache": cache}, prev,
                                  labels2, t - 1, method="decode_step",
                                  mutable=["cache"])
      return state["cache"], tokens.at[:, t].set(draw(logits, t))
    return jax.lax.fori_loop(1, seq_len, body, (state["cache"], tokens))[1]
  return jax.jit(run)


def bench_prefix(model, params, labels, key, bucket: int, g, pw, temp):
  """Official-style no-cache sampling: step t re-runs [cls, class, img_<t].
  Returns (compile seconds, run callable)."""
  n, b = model.seq_len, labels.shape[0]
  labels2 = common.cfg_labels(labels, model.num_classes)
  steps = {}

  def step_fn(k):
    # A model of length k sees the same parameters (tables are max_pos long);
    # k >= t + 1 keeps the target-aware PE of token t - 1.
    sub = model.clone(seq_len=k)

    @jax.jit
    def f(params, tokens, t, rng):
      logits = sub.apply({"params": params},
                         jnp.repeat(tokens[:, :k], 2, axis=0), labels2)
      logits = jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False)
      return rar_sample.pick(
          logits, t, rng, n, g, pw, temp, True)
    return f

  def run():
    tokens = jnp.zeros((b, n), jnp.int32)
    for t in range(n):
      k = min(n, -(-(t + 1) // bucket) * bucket)
      tokens = tokens.at[:, t].set(steps[k](params, tokens, t, key))
    return tokens

  tokens = jnp.zeros((b, n), jnp.int32)
  t0 = time.perf_counter()
  for k in sorted({min(n, -(-(t + 1) // bucket) * bucket) for t in range(n)}):
    steps[k] = step_fn(k)
    steps[k](params, tokens, 0, key)  # warm the jit cache for this shape
  return time.perf_counter() - t0, run


def check_tokens(model, params, labels, key, sargs, n: int, dtype, bucket):
  """``cached`` == ``sample_uncached`` on the model cut to n tokens."""
  sub = model.clone(seq_len=n)
  kw = dict(guidance_scale=sargs[0], guidance_pow=sargs[1],
            temperature=sargs[2])
  ours = rar_sample.sample(sub, params, labels, key, dtype=dtype,
                           bucket=bucket, **kw)
  ref = rar_sample.sample_uncached(sub, params, labels, key, **kw)
  return float(np.mean(np.asarray(ours) == np.asarray(ref)))


MODES = ("floor", "floor_noada", "floor_kv", "cached", "cached_bN",
         "reference", "full", "prefix")


def main():
  p = floor.parser(__doc__)
  p.add_argument("--size", default="small", choices=["small", "b", "l", "xl", "xxl"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--tokens", type=int, default=256, help="sequence length L")
  p.add_argument("--modes", default="floor,floor_noada,cached",
                 help=f"comma-separated, of: {', '.join(MODES)}")
  p.add_argument("--repeats", type=int, default=2, help="timed runs per mode")
  p.add_argument("--dtype", default="float32", choices=floor.DTYPES,
                 help="cached/floor decode dtype")
  p.add_argument("--bucket", type=int, default=None,
                 help="cached: kv_len chunk granularity (default the sampler's)")
  p.add_argument("--table_bytes", type=int, default=None,
                 help="cached: modulation-table cap (0 = per-step modulation)")
  p.add_argument("--prefix_bucket", type=int, default=32)
  p.add_argument("--check", action="store_true",
                 help="also compare the cached sampler's tokens with the "
                      "uncached reference")
  p.add_argument("--check_tokens", type=int, default=16)
  args = p.parse_args()
  floor.check_args(p, args, MODES)
  from configs import rar_common  # pylint: disable=import-outside-toplevel
  precision = floor.sampling_precision(rar_common.get_config(
      "b" if args.size == "small" else args.size))
  if args.table_bytes is not None:
    rar_sample.TABLE_BYTES = args.table_bytes

  cfg = model_config(args.size, args.tokens)
  model = models.build(cfg)
  params = jax.jit(lambda k: models.init_params(cfg, k))(jax.random.key(0))
  # adaLN kernels start at zero; random values keep the chain honest.
  params = jax.tree_util.tree_map(lambda x: x + 0.02 * jnp.sin(
      jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
  n_params = models.count_params(params) / 1e6
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  key = jax.random.key(1)
  g, pw, temp = 4.0, 1.0, 1.0
  sargs = tuple(jnp.float32(v) for v in (g, pw, temp))
  dtype = None if args.dtype == "float32" else args.dtype
  rows, steps = 2 * args.batch, args.tokens
  dev = jax.devices()[0]
  print(f"# RAR sampling | size={args.size} ({n_params:.1f}M params) "
        f"batch={args.batch} (x2 CFG = {rows} rows) tokens={args.tokens} "
        f"dtype={args.dtype} bucket={args.bucket} matmuls {precision} | "
        f"{dev.platform}:"
        f"{getattr(dev, 'device_kind', '')} "
        f"{platform.processor() or platform.machine()} jax {jax.__version__} "
        f"| commit {commit_id()}", flush=True)

  runs, compile_s = {}, {}
  for mode in args.modes.split(","):
    if mode in ("floor", "floor_noada", "floor_kv"):
      kv = None if mode != "floor_kv" else floor.kv_stand_in(
          model.depth, rows, model.num_heads,
          model.hidden_size // model.num_heads, steps + PREFIX, dtype)
      c, f = floor.aot(floor_fn(model, steps, rows, mode == "floor", dtype,
                                with_kv=kv is not None, bucket=args.bucket),
                       params, kv)
    elif mode == "cached" or mode.startswith("cached_b"):
      bucket = int(mode[len("cached_b"):]) if mode != "cached" else args.bucket
      fn = rar_sample.sampler_fn(model, cached=True, use_cfg=True,
                                 **floor.sampler_opts(dtype, bucket))
      c, f = floor.aot(fn, params, labels, key, *sargs)
    elif mode == "reference":
      c, f = floor.aot(reference_fn(model, steps, True), params, labels, key,
                       *sargs)
    elif mode == "full":
      fn = rar_sample.sampler_fn(model, cached=False, use_cfg=True)
      c, f = floor.aot(fn, params, labels, key, *sargs)
    elif mode == "prefix":
      c, f = bench_prefix(model, params, labels, key, args.prefix_bucket,
                          g, pw, temp)
    else:
      raise ValueError(f"Unknown mode {mode!r}; use floor, floor_noada, "
                       "floor_kv, cached, reference, full, prefix.")
    runs[mode], compile_s[mode] = f, c
    print(f"compiled {mode} in {c:.1f} s", flush=True)

  times, outs = floor.time_interleaved(runs, args.repeats)
  floor.print_floor_table(times, compile_s, "step", steps, args.batch)
  floor.print_bytes(*byte_counts(model, params, rows, dtype, args.bucket))

  if args.check:
    same_ref = None
    if "cached" in outs and "reference" in outs:
      same_ref = float(np.mean(np.asarray(outs["cached"]) ==
                               np.asarray(outs["reference"])))
      print(f"check: cached == reference KV loop in {same_ref:.4f} of tokens")
    if dtype is not None and "cached" in outs:
      fp32 = rar_sample.sampler_fn(model, cached=True, use_cfg=True,
                                   bucket=args.bucket)(params, labels, key, *sargs)
      same = float(np.mean(np.asarray(outs["cached"]) == np.asarray(fp32)))
      print(f"check: {args.dtype} cached == float32 cached in {same:.4f} of "
            "tokens")
    frac = check_tokens(model, params, labels, key, sargs, args.check_tokens,
                        dtype, 8)
    print(f"check: cached == sample_uncached ({args.check_tokens}-token cut, "
          f"bucket 8) in {frac:.4f} of tokens")
    exact = [frac] + ([same_ref] if same_ref is not None else [])
    if dtype is None and min(exact) < 1.0:
      sys.exit("check failed: fp32 cached sampling differs from the "
               "reference samplers (fractions above)")


if __name__ == "__main__":
  main()
