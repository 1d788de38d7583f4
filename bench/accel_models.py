"""Accelerator-suite sections of the generators and the evaluator: RAR / FAR /
Equivariant sampling and the FID Inception extractor (see
``bench/accelerator.py``; the RAR-XL train step is ``bench/accel_train.py``).
Random weights: speed and memory numbers, not quality ones."""

from __future__ import annotations

import functools
import statistics
import time

from bench.accel_harness import (SMOKE_EQ, SMOKE_FAR, SMOKE_RAR, Deadline,
                                 Section, Sizes, aot, block, host_random_params,
                                 load_config, random_params, repeat_ms, shrink,
                                 timed, timed_runs)

WEIGHT_READ_NOTE = (
    "weight_gb_per_s = all parameter bytes (in dtype) / time per step: the "
    "rate at which a step that reads every weight once would stream them, to "
    "hold against the memory bandwidth (H200 HBM3e: 4.8 TB/s); RAR's adaLN "
    "weights are not read per step (per-chunk tables), so its true rate is "
    "lower.")


FLOOR_NOTE = (
    "floor_s = the bare matmul chain over the same weights at the same rows "
    "and dtype, one chain per step and nothing else (bench/bench_*_sampling.py"
    "'s `floor`: RAR every block's qkv, out, fc1, fc2 and adaLN, the head's "
    "adaLN, then lm_head; "
    "FAR aggregation, backbone, per sub-token the head and its output); "
    "x_floor = sample_s / floor_s, both timed here. bytes_ratio = the bytes "
    "an exact cached step must read (its weights once, its KV cache over the "
    "filled prefix) over the floor's: the least x_floor can be where both "
    "stream at one rate (at large batch the cache outweighs the weights).")


def _bytes_ratio(bench, model, params, batch: int, dtype: str,
                 bucket: int | None = None) -> float:
  """(weights + KV cache an exact cached step reads) / the floor's bytes, by
  the bench script's ``byte_counts`` (CFG: 2 * batch rows)."""
  floor, weights, cache = bench.byte_counts(model, params, 2 * batch, dtype,
                                            bucket=bucket)
  return (weights + cache) / floor


def weight_read_gbps(n_params: int, dtype: str, step_ms: float) -> float:
  """GB/s a decode step of ``step_ms`` would stream reading every weight once."""
  item = 2 if dtype == "bfloat16" else 4
  return n_params * item / (step_ms * 1e-3) / 1e9


def _at_sampling_precision(spec: str):
  """Runs a section at the fp32 matmul precision ``mode=sample`` runs the
  config ``spec`` at (``dtypes.precision_name(config, inference=True)``), so
  its rows time what sampling computes; the section logs it."""
  def wrap(fn):
    @functools.wraps(fn)
    def run(sec, *args, **kwargs):
      import jax  # pylint: disable=import-outside-toplevel
      from genvis_jax.core import dtypes  # pylint: disable=import-outside-toplevel
      name = dtypes.precision_name(load_config(spec), inference=True)
      sec.log(f"fp32 matmuls at {name!r}, as mode=sample")
      with jax.default_matmul_precision(name):
        return fn(sec, *args, **kwargs)
    return run
  return wrap


@_at_sampling_precision("configs/rar_b.py")
def section_rar_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import ar  # pylint: disable=import-outside-toplevel
  tok_cfg = load_config("configs/maskgit_vqgan.py").model
  if smoke:
    from configs import maskgit_vqgan  # pylint: disable=import-outside-toplevel
    tok_cfg = maskgit_vqgan.runlocal_model(tok_cfg)
  tok_cfg.dtype = "float32"   # decode in fp32 (the project's sampling rule)
  tok = models.build(tok_cfg)
  decoder = None
  if sz.rar_decode:
    decoder = dict(params=random_params(tok_cfg, 1), done={}, fn=jax.jit(
        lambda p, c: tok.apply({"params": p}, c, method="decode")))
  last_cost = 0.0
  for size in sz.rar_sizes:
    cfg = load_config(f"configs/rar_{size}.py")
    m = cfg.model
    if smoke:
      shrink(m, SMOKE_RAR)
    m.dtype = "float32"   # the sample dtype switch sets the compute dtype
    model = models.build(m)
    dl.check(f"RAR-{size} init")
    params = random_params(m)
    for batch in sz.rar_batches:
      for dtype in sz.sample_dtypes:
        floor_cache = {}   # the floor does not depend on the bucket
        for bucket in sz.rar_buckets:
          bucket = ar.DEFAULT_BUCKET if bucket is None else bucket
          what = f"RAR-{size} batch {batch} {dtype} bucket {bucket}"
          # Expect about as long as the previous case; skip what would overrun.
          dl.require(last_cost, what)
          t_case = time.perf_counter()
          _rar_case(sec, dl, sz, size, what, model, cfg, params, batch,
                    dtype, bucket, decoder, floor_cache)
          last_cost = 0.8 * (time.perf_counter() - t_case)
    del params
  sec.note("CFG doubles the batch (cond + null class rows); guidance settings "
           "from the config; dtype = the sampler's dtype switch (bfloat16: "
           "parameters cast once, matmuls and KV cache bf16, logits and "
           "sampling fp32); bucket = the KV-cache chunk of the cached decoder "
           "(one compiled loop body per chunk; 0: one body over the whole "
           "cache); MaskGIT VQGAN decode in fp32; compile excluded from "
           "images/s; random weights. " + WEIGHT_READ_NOTE + " " + FLOOR_NOTE)


def _rar_case(sec, dl, sz, size, what, model, cfg, params, batch, dtype,
              bucket, decoder, floor_cache):
  """One RAR sampling row: compile, sample, then (time allowing) the matmul
  floor (``floor_cache``: floor_s per (batch, dtype), shared by the buckets)
  and the VQGAN decode. The row is kept, and printed, whatever is cut."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bench import bench_rar_sampling as rar_bench  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import rar as rar_sample  # pylint: disable=import-outside-toplevel
  m, s = cfg.model, cfg.sample
  sampler = rar_sample.sampler_fn(model, cached=True, use_cfg=True,
                                  dtype=dtype, bucket=bucket)
  labels = jnp.arange(batch, dtype=jnp.int32) % m.num_classes
  args = (params, labels, jax.random.key(batch), jnp.float32(
      s.guidance_scale), jnp.float32(s.guidance_pow), jnp.float32(
          s.temperature))
  comp_s, compiled = aot(sampler, *args)
  sec.log(f"{what}: compiled in {comp_s:.1f} s")
  # A first run carries one-off costs (1.3-1.5x the next ones on a CPU); the
  # floor has its warm-up too (repeat_ms). Skipped past the time box, where
  # the one timed run is all the row gets.
  if dl.left() > 0:
    block(compiled(*args))
  runs = timed_runs(compiled, args, dl, sz.iters)
  sample_s = statistics.median(t for t, _ in runs)
  step_ms = 1e3 * sample_s / m.seq_len
  n_params = models.count_params(params)
  row = dict(model=f"RAR-{size.upper()}", dtype=dtype,
             params_m=n_params / 1e6, batch=batch, tokens=m.seq_len,
             bucket=bucket, compile_s=comp_s, sample_s=sample_s,
             step_ms=step_ms,
             weight_gb_per_s=weight_read_gbps(n_params, dtype, step_ms),
             bytes_ratio=_bytes_ratio(rar_bench, model, params, batch, dtype,
                                      bucket),
             images_per_s=batch / sample_s)
  sec.keep(row)   # the floor and decode columns follow, time allowing
  sec.log(f"sampled in {sample_s:.3f} s ({len(runs)} runs)")
  try:
    make = functools.partial(rar_bench.floor_fn, model, m.seq_len, 2 * batch,
                             adaln=True, dtype=dtype)
    _floor_columns(row, make, params, dl, sz, f"{what} floor", floor_cache)
    if decoder is not None:
      _decode_columns(row, dl, sz, decoder, batch, m.seq_len, runs[-1][1],
                      sample_s)
  finally:
    sec.show(row)


def _floor_columns(row, make_floor, params, dl, sz, what, cache):
  """Adds ``floor_s`` (the bench script's matmul floor, ``make_floor()``,
  timed once per ``cache`` dict) and ``x_floor`` = the row's sample_s over
  it."""
  if "s" not in cache:
    cache["s"] = repeat_ms(make_floor(), (params, None), dl, sz.iters,
                           what) / 1e3
  row.update(floor_s=cache["s"], x_floor=row["sample_s"] / cache["s"])


def _decode_columns(row, dl, sz, decoder, batch, seq_len, codes, sample_s):
  """The MaskGIT VQGAN decode's columns of a RAR row (timed once per batch:
  its cost does not depend on the sampler)."""
  done = decoder["done"]
  if batch not in done:
    dl.check(f"decode batch {batch}")
    side = int(round(seq_len ** 0.5))
    codes = codes.reshape(batch, side, side)
    dcomp_s, dcompiled = aot(decoder["fn"], decoder["params"], codes)
    block(dcompiled(decoder["params"], codes))   # warm-up, as above
    done[batch] = (dcomp_s, statistics.median(
        timed(dcompiled, decoder["params"], codes)[0]
        for _ in range(sz.iters)))
  dcomp_s, dec_s = done[batch]
  row.update(decode_compile_s=dcomp_s, decode_s=dec_s,
             images_per_s_decoded=batch / (sample_s + dec_s))


def _random_generator(spec: str, smoke_sizes: dict, smoke: bool, batch: int):
  """A paper config's generator with random weights (shrunk to
  ``smoke_sizes`` under --smoke) and ``batch`` labels cycling the classes:
  ``(config, model, params, labels)``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  cfg = load_config(spec)
  if smoke:
    shrink(cfg.model, smoke_sizes)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.model.num_classes
  return cfg, models.build(cfg.model), random_params(cfg.model), labels


@_at_sampling_precision("configs/far_b.py:dual")
def section_far_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  from bench import bench_far_sampling as far_bench  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import far as far_sample  # pylint: disable=import-outside-toplevel
  batch = sz.far_batch
  cfg, model, params, labels = _random_generator(
      "configs/far_b.py:dual", SMOKE_FAR, smoke, batch)
  m, s = cfg.model, cfg.sample
  model = model.clone(dtype="float32")   # the sample dtype switch sets it
  n_params = models.count_params(params)
  steps = m.num_codebooks * m.grid ** 2
  for dtype in sz.sample_dtypes:
    dl.check(f"FAR {dtype}")
    run = lambda dt=dtype: far_sample.sample(
        model, params, labels, jax.random.key(0),
        guidance_scale=s.guidance_scale, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, dtype=dt)
    comp_s, _ = timed(run)   # first call compiles (cached jit afterwards)
    sec.log(f"FAR {dtype}: first call (compiles) {comp_s:.1f} s")
    sec_s = statistics.median(dt for dt, _ in timed_runs(run, (), dl, sz.iters))
    position_ms = 1e3 * sec_s / m.grid ** 2
    row = dict(model="FAR-B dual", dtype=dtype, batch=batch, sub_tokens=steps,
               first_call_s=comp_s, sample_s=sec_s, position_ms=position_ms,
               weight_gb_per_s=weight_read_gbps(n_params, dtype, position_ms),
               bytes_ratio=_bytes_ratio(far_bench, model, params, batch,
                                        dtype),
               images_per_s=batch / sec_s,
               sub_tokens_per_s=batch * steps / sec_s)
    sec.keep(row)   # the floor columns follow if the time box allows
    sec.log(f"sampled in {sec_s:.3f} s")
    try:
      make = functools.partial(far_bench.floor_fn, model, m.grid ** 2,
                               2 * batch, dtype=dtype)
      _floor_columns(row, make, params, dl, sz, f"FAR {dtype} floor", {})
    finally:
      sec.show(row)
  sec.note(f"guidance {s.guidance_scale} (CFG doubles the batch), codes only "
           "(no FQGAN decode); first_call_s includes compilation; dtype as in "
           "rar_sampling. " + WEIGHT_READ_NOTE + " " + FLOOR_NOTE)


@_at_sampling_precision("configs/eq_l.py")
def section_eq_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import eq_generator as eq_sample  # pylint: disable=import-outside-toplevel
  batch = sz.eq_batch
  cfg, model, params, labels = _random_generator(
      "configs/eq_l.py", SMOKE_EQ, smoke, batch)
  m, s = cfg.model, cfg.sample
  for cols in sz.eq_columns:
    dl.check(f"{cols} columns")
    run = lambda c=cols: eq_sample.sample(
        model, params, labels, jax.random.key(0), num_columns=c,
        guidance_scale=s.guidance_scale,
        num_steps=sz.eq_flow_steps)
    comp_s, _ = timed(run)
    sec.log(f"{cols} columns: first call (compiles) {comp_s:.1f} s")
    t = statistics.median(dt for dt, _ in timed_runs(run, (), dl, sz.iters))
    sec.add(model="Eq-L", dtype=m.dtype, batch=batch, columns=cols,
            flow_steps=sz.eq_flow_steps, first_call_s=comp_s, sample_s=t,
            columns_per_s=batch * cols / t, images_per_s=batch / t)
  sec.note(f"guidance {s.guidance_scale} (doubled batch), Euler flow steps per column as "
           "listed; columns_per_s counts columns of all images in the batch; "
           "generator latents only (no tokenizer decode).")


def section_inception(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from genvis_jax.core import sharding  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate.inception import InceptionExtractor  # pylint: disable=import-outside-toplevel
  from genvis_jax.models import inception as inc  # pylint: disable=import-outside-toplevel
  params = host_random_params(jax.eval_shape(inc.init_inception_params))
  mesh = sharding.data_mesh(jax.devices()[:1])
  ext = InceptionExtractor(params, batch_size=sz.incep_batch, mesh=mesh)
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (sz.incep_batch, sz.incep_image, sz.incep_image,
                               3)).astype(np.uint8)
  comp_s, out = timed(ext, images)
  if out["pool"].shape != (sz.incep_batch, 2048) or not np.isfinite(
      out["pool"]).all():
    raise AssertionError(f"bad pool features {out['pool'].shape}")
  t = statistics.median(
      dt for dt, _ in timed_runs(ext, (images,), dl, sz.iters))
  sec.add(batch=sz.incep_batch, image=sz.incep_image, first_call_s=comp_s,
          batch_s=t, images_per_s=sz.incep_batch / t)
  sec.note("uint8 host images -> device -> resize to 299 -> pool / spatial / "
           "logits back to host, fp32 at 'highest' matmul precision (as the "
           "FID evaluation runs it); random weights.")

