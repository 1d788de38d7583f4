"""Accelerator-suite section of the RAR-XL train step at the largest batch
that fits, per remat policy (see ``bench/accelerator.py``): step time,
tokens/s, MFU and peak memory, random weights and random token batches."""

from __future__ import annotations

import math
import statistics
import time

from bench.accel_harness import (SMOKE_RAR, Deadline, Section,
                                 SectionTimeout, Sizes, block, cost_flops,
                                 device_memory, error_line, gib, load_config,
                                 memory_bytes, peak_flops, shrink, timed_runs)


def _rar_trainer(remat: str, batch: int, smoke: bool, devices):
  from bench import plan_memory  # pylint: disable=import-outside-toplevel
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  config = load_config("configs/rar_xl.py")
  if smoke:
    shrink(config.model, SMOKE_RAR)
    with config.unlocked():
      config.data.seq_len = config.model.seq_len
  config = plan_memory.apply_overrides(
      config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, batch=batch,
      micro_batches=1, remat=remat, dtype="bfloat16")
  mesh = shd.create_mesh(config.mesh, devices)
  return config, trainer_lib.Trainer(config, mesh=mesh)


def _compile_step(config, tr):
  from bench import plan_memory  # pylint: disable=import-outside-toplevel
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  spec = plan_memory.batch_spec(config, tr.task, config.train.global_batch_size,
                                shd.batch_sharding(tr.mesh, tr.rules))
  rng = jax.ShapeDtypeStruct(tr.train_rng.shape, tr.train_rng.dtype,
                             sharding=shd.replicated(tr.mesh))
  with tr.context():
    t0 = time.perf_counter()
    lowered = tr._step.lower(  # pylint: disable=protected-access
        tr.abstract_state(), spec, rng, tr.frozen)
    compiled = lowered.compile()
  compiled.lowered_flops = cost_flops(lowered)
  return time.perf_counter() - t0, compiled, spec


def _random_batch(spec, config):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  hi = {"label": config.model.num_classes, "tokens": config.model.codebook_size}
  return {k: jax.device_put(rs.randint(0, hi[k], s.shape).astype(s.dtype),
                            s.sharding) for k, s in spec.items()}


def _pow2_floor(x: float, cap: int) -> int:
  return max(1, min(cap, 2 ** int(math.log2(max(1.0, x)))))


# The share of device memory a train step's compiled peak may take (and, on a
# GPU, the allocator's share: bench/accelerator.py sets it before jax starts).
MEMORY_FRACTION = 0.92


def _fit_batch(capacity, b0, peak0, b1, peak1, cap) -> int:
  """Largest power-of-two batch whose compiled peak stays under
  ``MEMORY_FRACTION`` of the device memory, from two (batch, peak bytes)
  points (peak ~ linear in batch)."""
  slope = max(1.0, (peak1 - peak0) / (b1 - b0))
  return _pow2_floor(
      (MEMORY_FRACTION * capacity - (peak1 - slope * b1)) / slope, cap)


# --device_memory_gib: plan the train batch for another memory size (also how
# the probe / fit path is exercised on CPU, which reports no memory limit).
CAPACITY_OVERRIDE = None


def section_rar_train(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  """RAR-XL train step per remat policy at the largest batch that fits.

  With a known device memory: one probe compile at a small batch plus the
  argument bytes give a first estimate; after measuring it, the two compiled
  peaks give a linear fit and a larger batch is tried when it fits. A batch
  that fails (out of memory) is halved.
  """
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  peak = peak_flops(dev.device_kind)
  capacity = CAPACITY_OVERRIDE or device_memory(dev).get("bytes_limit")
  sec.note(f"device memory for the batch fit: {gib(capacity):.3g} GiB"
           if capacity else "device memory unknown: batch = the largest tried")
  sec.note(f"device bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak else
           f"no bf16 peak known for {dev.device_kind!r}: MFU omitted")
  best, last_cost = None, 0.0
  sec.note("One device, AdamW, bf16 compute with fp32 parameters and optimizer "
           "state, 256 tokens per image. mfu = the compiled step's XLA FLOPs "
           "(cost_analysis; includes remat recomputation; flops_from=lowered: the "
           "unoptimized HLO's count, used when the compiled one is under half "
           "of it) / step time / chip "
           "bf16 peak; mfu_6n uses 6 x params x tokens (model FLOPs without "
           "attention). peak_gib_compiled: memory_analysis arguments + outputs "
           "- aliases + temporaries; peak_gib_device: memory_stats "
           "peak_bytes_in_use since the start of the run.")
  try:
    for remat in sz.train_remats:
      dl.require(last_cost, f"remat={remat}")
      t_remat = time.perf_counter()
      batch, probe = sz.train_max, None
      if capacity:
        config, tr = _rar_trainer(remat, sz.train_probe, smoke, [dev])
        probe = memory_bytes(_compile_step(config, tr)[1])
        del tr
        if probe:
          # State (arguments) is fixed; count all temporaries as per-example.
          fixed = probe["argument"] + probe["generated_code"]
          per_example = max(1.0, (probe["peak"] - fixed) / sz.train_probe)
          batch = _pow2_floor(
              (MEMORY_FRACTION * capacity - fixed) / per_example, sz.train_max)
      tried, row = set(), None
      while batch >= 1 and batch not in tried:
        tried.add(batch)
        dl.check(f"remat={remat} batch={batch}")
        t_measure = time.perf_counter()
        try:
          new = _measure_step(remat, batch, smoke, dev, dl, sz, peak, capacity)
        except SectionTimeout:
          raise
        except Exception as e:  # pylint: disable=broad-except
          sec.note(f"remat={remat} batch={batch}: {error_line(e)}")
          gc.collect()
          if row:       # a larger try failed: keep the measured one
            break
          batch //= 2   # out of memory at compile or run time
          continue
        peak_b = new.pop("_peak")
        sec.add(**new)
        row = new
        if not (capacity and probe and peak_b and batch > sz.train_probe):
          break
        grown = _fit_batch(capacity, sz.train_probe, probe["peak"], batch,
                           peak_b, sz.train_max)
        if grown <= batch:
          break
        if dl.left() < time.perf_counter() - t_measure:
          sec.note(f"remat={remat}: batch {grown} would fit; no time to try")
          break
        batch = grown
      if row and (best is None or row["tokens_per_s"] > best["tokens_per_s"]):
        best = row
      gc.collect()
      # The next policy compiles as often, and its steps take no less time.
      last_cost = 0.8 * (time.perf_counter() - t_remat)
  finally:   # also when the time box ends
    if best:
      sec.note(f"best: remat={best['remat']} batch={best['batch']} "
               f"{best['tokens_per_s']:.0f} tokens/s")


def _measure_step(remat, batch, smoke, dev, dl, sz, peak, capacity):
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  config, tr = _rar_trainer(remat, batch, smoke, [dev])
  comp_s, compiled, spec = _compile_step(config, tr)
  mem = memory_bytes(compiled)
  if capacity and mem and mem["peak"] > capacity:
    raise MemoryError(f"compiled peak {gib(mem['peak']):.1f} GiB > "
                      f"{gib(capacity):.1f} GiB")
  # The optimized HLO's count; if the backend's cost model misses fused
  # library calls (much less than the unoptimized HLO's), use the latter.
  flops, lowered = cost_flops(compiled), getattr(compiled, "lowered_flops", None)
  flops_from = "compiled"
  if lowered and (not flops or flops < 0.5 * lowered):
    flops, flops_from = lowered, "lowered"
  data = _random_batch(spec, config)
  state = tr.init_state()
  n_params = models.count_params(state.params)

  def step():   # one train step on the last one's state; its metrics
    nonlocal state
    state, metrics = compiled(state, data, tr.train_rng, tr.frozen)
    return metrics

  block(step())   # warm-up
  runs = timed_runs(step, (), dl, sz.train_steps)
  loss = float(runs[-1][1]["loss"])
  step_s = statistics.median(t for t, _ in runs)
  tokens = batch * config.model.seq_len
  stats = device_memory(dev)
  del state
  return dict(
      remat=remat, batch=batch, params_m=n_params / 1e6, compile_s=comp_s,
      step_s=step_s, tokens_per_s=tokens / step_s, images_per_s=batch / step_s,
      tflops_xla=(flops / step_s / 1e12) if flops else None,
      flops_from=flops_from if flops else None,
      mfu=(flops / step_s / peak) if flops and peak else None,
      mfu_6n=(6 * n_params * tokens / step_s / peak) if peak else None,
      peak_gib_compiled=gib(mem.get("peak")), _peak=mem.get("peak"),
      peak_gib_device=gib(stats.get("peak_bytes_in_use")),
      in_use_gib_device=gib(stats.get("bytes_in_use")),
      loss=loss, steps_timed=len(runs))
