"""Benchmark windowed causal attention: dense vs banded XLA vs Pallas.

Times the forward pass and forward + backward (grads of q, k, v) as the
sequence grows at a fixed window, and prints one row per (N, impl, mode):
milliseconds (median of ``--iters``) and the time relative to dense attention
(``time_x_dense``: its time over dense's, < 1 is faster; ``W``: the window
in columns of ``--tokens_per_column`` tokens).

  python bench/bench_windowed_attention.py              # CPU-sized defaults
  python -m bench.bench_windowed_attention               # same, not installed
  python bench/bench_windowed_attention.py --preset=gpu # heads 16, dim 64, N to 16k
  python bench/bench_windowed_attention.py --seqs=1024,4096 --window=4 \\
      --tokens_per_column=1 --impls=dense,reference,pallas_gpu

The Pallas kernel of the current backend is included by default on GPU/TPU;
on CPU Pallas would only run in interpret mode, which says nothing about speed.
A case that fails (e.g. dense attention out of memory) is reported and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from genvis_jax.kernels.windowed_attention import (resolve_impl,
                                                   windowed_causal_attention)

PRESETS = {
    "cpu": dict(batch=1, heads=2, head_dim=32, seqs="256,512,1024,2048"),
    "gpu": dict(batch=1, heads=16, head_dim=64,
                seqs="1024,2048,4096,8192,16384"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS),
                 help="sizes; default: gpu on an accelerator, else cpu")
  p.add_argument("--seqs", help="comma-separated sequence lengths N")
  p.add_argument("--batch", type=int)
  p.add_argument("--heads", type=int)
  p.add_argument("--head_dim", type=int)
  p.add_argument("--window", type=int, default=4, help="window in columns")
  p.add_argument("--tokens_per_column", type=int, default=16)
  p.add_argument("--impls", help="comma-separated; default dense,reference "
                 "(+ the backend's Pallas kernel on GPU/TPU)")
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--block_q", type=int)
  p.add_argument("--block_k", type=int)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args(argv)
  backend = jax.default_backend()
  preset = PRESETS[args.preset or ("cpu" if backend == "cpu" else "gpu")]
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.impls is None:
    auto = resolve_impl("auto", backend)
    args.impls = "dense,reference" + ("" if auto == "reference" else f",{auto}")
  return args


def make_fn(impl, mode, args):
  """A jitted fn(q, k, v, do) for one implementation and mode."""
  kw = dict(window=args.window, tokens_per_column=args.tokens_per_column,
            impl=impl, block_q=args.block_q, block_k=args.block_k)
  attend = lambda q, k, v: windowed_causal_attention(q, k, v, **kw)
  if mode == "fwd":
    return jax.jit(lambda q, k, v, do: attend(q, k, v))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(do)
  return jax.jit(fwd_bwd)


def time_ms(fn, inputs, warmup, iters):
  for _ in range(warmup):
    jax.block_until_ready(fn(*inputs))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def run(args):
  impls = args.impls.split(",")
  modes = args.modes.split(",")
  dtype = jnp.dtype(args.dtype)
  print(f"backend={jax.default_backend()} batch={args.batch} heads="
        f"{args.heads} head_dim={args.head_dim} window={args.window} "
        f"tokens_per_column={args.tokens_per_column} dtype={args.dtype}")
  print(f"{'N':>7} {'W(col)':>6} {'mode':>8} {'impl':>11} {'ms':>10} "
        f"{'time_x_dense':>12}")
  rows = []
  for n in (int(s) for s in args.seqs.split(",")):
    keys = jax.random.split(jax.random.key(n), 4)
    shape = (args.batch, n, args.heads, args.head_dim)
    inputs = [jax.random.normal(k, shape, dtype) for k in keys]
    for mode in modes:
      dense_ms = None
      for impl in impls:
        try:
          ms = time_ms(make_fn(impl, mode, args), inputs, args.warmup,
                       args.iters)
        except Exception as e:  # e.g. dense O(N^2) logits out of memory
          print(f"{n:>7} {args.window:>6} {mode:>8} {impl:>11} "
                f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
          continue
        if impl == "dense":
          dense_ms = ms
        ratio = f"{ms / dense_ms:12.3f}" if dense_ms else f"{'-':>12}"
        print(f"{n:>7} {args.window:>6} {mode:>8} {impl:>11} {ms:10.2f} "
              f"{ratio}", flush=True)
        rows.append((n, args.window, mode, impl, ms))
  return rows


if __name__ == "__main__":
  run(parse_args())
