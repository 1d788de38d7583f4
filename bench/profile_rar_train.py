"""Where the time of one RAR train step goes (fp32, one device, random data).

Times, in one process and interleaved, the jitted pieces of the step the RAR
task runs (random orders, label dropout, teacher-forced forward with dropout,
cross-entropy): forward + loss, forward + backward (``value_and_grad``), the
AdamW update alone, and the whole step (grads + update; timed without
donation, so each call keeps its inputs), and
reads XLA's cost analysis (FLOPs, bytes accessed) of each to give the achieved
GFLOP/s and GB/s.

  python bench/profile_rar_train.py --size=b --batch=8

It runs with glibc's default malloc, not ``genvis_jax.cpu_malloc.tune()``:
the tuned heap (one arena, no mmap) does not return the freed temporaries of
these four executables and fragments past 24 GB at RAR-B batch 8.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

# Run as a script from anywhere: the repository root is where ``bench`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.accel_harness import commit_id  # pylint: disable=wrong-import-position
from bench.bench_rar_sampling import model_config  # pylint: disable=wrong-import-position
from genvis_jax import models
from genvis_jax.train.tasks import rar as rar_task


def _cost(compiled):
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="b", choices=["small", "b", "l", "xl"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  cfg = model_config(args.size, 256)
  model = models.build(cfg)
  params = jax.jit(lambda k: models.init_params(cfg, k))(jax.random.key(0))
  b, n = args.batch, cfg.seq_len
  tokens = jax.random.randint(jax.random.key(1), (b, n), 0, cfg.codebook_size)
  labels = jnp.arange(b, dtype=jnp.int32) % cfg.num_classes
  rng = jax.random.key(2)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.96, weight_decay=0.03)
  opt = tx.init(params)

  def loss(p, rng):
    k_order, k_label, k_drop = jax.random.split(rng, 3)
    orders = rar_task.sample_orders(k_order, b, n, 1.0)
    lab = rar_task.drop_labels(k_label, labels, 0.1, cfg.num_classes)
    logits = model.apply({"params": p}, tokens, lab, orders, train=True,
                         rngs={"dropout": k_drop})
    return rar_task.ar_loss(logits, rar_task.permute(tokens, orders))[0]

  grad = jax.value_and_grad(loss)

  def update(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  def step(p, o, rng):
    _, g = grad(p, rng)
    return update(p, o, g)

  # The update's cost does not depend on the values (a jitted grad here
  # would compile forward+backward before its timed compile below).
  g0 = jax.tree_util.tree_map(jnp.zeros_like, params)
  pieces = {
      "forward+loss": (jax.jit(loss), (params, rng)),
      "forward+backward": (jax.jit(grad), (params, rng)),
      "adamw update": (jax.jit(update), (params, opt, g0)),
      "whole step": (jax.jit(step), (params, opt, rng)),
  }
  compiled = {}
  for name, (fn, a) in pieces.items():
    t0 = time.perf_counter()
    compiled[name] = (fn.lower(*a).compile(), a)
    print(f"compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
  for c, a in compiled.values():   # untimed: a first run's one-off costs
    jax.block_until_ready(c(*a))
  times = {k: [] for k in compiled}
  for _ in range(args.repeats):
    for name, (c, a) in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*a))
      times[name].append(time.perf_counter() - t0)
  dev = jax.devices()[0]
  print(f"# RAR train step pieces | size={args.size} "
        f"({models.count_params(params) / 1e6:.1f}M) batch={b} fp32 | "
        f"{dev.platform} {platform.processor() or platform.machine()} "
        f"jax {jax.__version__} | commit {commit_id()}")
  print("| piece | s (median) | runs | GFLOP | GFLOP/s | GB accessed | GB/s |")
  print("|---|---|---|---|---|---|---|")
  for name, (c, _) in compiled.items():
    s = statistics.median(times[name])
    fl, by = _cost(c)
    runs = " / ".join(f"{t:.2f}" for t in times[name])
    print(f"| {name} | {s:.2f} | {runs} | {fl / 1e9:.0f} | {fl / 1e9 / s:.0f} | "
          f"{by / 1e9:.1f} | {by / 1e9 / s:.1f} |")


if __name__ == "__main__":
  main()
