"""The shared KV-cache decode loop (chunked cache, modulation tables, bf16)
used by the RAR and FAR samplers, on tiny models (CPU, about 1 min)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax import errors
from genvis_jax import models
from genvis_jax.sample import ar
from genvis_jax.sample import common
from genvis_jax.sample import far as far_sample
from genvis_jax.sample import rar as rar_sample
from tests import test_far
from tests import test_rar
from tests.sharding_checks import run_batch_sharded

RAR_KW = dict(guidance_scale=3.0, guidance_pow=1.0, temperature=1.0)
FAR_KW = dict(guidance_scale=2.0, temperature=1.0)


@pytest.fixture(scope="module")
def rar():
  cfg = test_rar.tiny_config()
  model = models.build(cfg.model)
  params = jax.jit(lambda k: test_rar.jitter(
      models.init_params(cfg.model, k), jax.random.fold_in(k, 1)))(
          jax.random.key(0))
  labels = jnp.arange(8) % test_rar.C
  ref = rar_sample.sample_uncached(model, params, labels, jax.random.key(7),
                                   **RAR_KW)
  return model, params, labels, ref


@pytest.mark.parametrize("num_steps,offset,bucket", [
    (256, 2, 64), (256, 1, 64), (16, 2, 4), (16, 1, 5), (16, 2, 0), (3, 2, 64),
    (1, 2, 4)])
def test_kv_chunks_cover_every_step_with_enough_cache(num_steps, offset, bucket):
  chunks = ar.kv_chunks(num_steps, offset, bucket)
  steps = [t for s, e, _ in chunks for t in range(s, e)]
  assert steps == list(range(1, num_steps))          # each step once, in order
  for s, e, kv in chunks:
    assert s < e and kv >= e - 1 + offset            # last step's position fits
    assert kv <= num_steps - 1 + offset              # never beyond the sequence
    if bucket > 0 and e < num_steps:
      assert kv % bucket == 0
  if bucket > 0 and num_steps > 2 * bucket:
    assert chunks[0][2] == bucket                    # early steps read a short cache


def test_rar_chunked_and_per_step_modulation_equal_uncached(rar, monkeypatch):
  """Several cache chunks (bucket 4 over 16 tokens) with per-chunk modulation
  tables, and with the per-step fallback, draw the reference tokens."""
  model, params, labels, ref = rar
  key = jax.random.key(7)
  out = rar_sample.sample(model, params, labels, key, bucket=4, **RAR_KW)
  np.testing.assert_array_equal(out, ref)
  monkeypatch.setattr(rar_sample, "TABLE_BYTES", 0)
  common.compiled.cache_clear()
  out = rar_sample.sample(model, params, labels, key, bucket=8, **RAR_KW)
  common.compiled.cache_clear()
  np.testing.assert_array_equal(out, ref)


def test_at_most_two_chunks_of_tables_are_live(rar, monkeypatch):
  """Each chunk's modulation tables depend on the weights and labels alone,
  so XLA computed every chunk's before the first decode loop, all live at
  once (RAR-B, 32 classes per device: 1.2 GiB of temporaries more). Each
  now waits for the loop before the one it runs beside (``ar.after``): 4
  chunks of tables took 3.4 chunks' bytes beyond the per-step modulation,
  now at most 2."""
  model, params = rar[:2]
  labels = jax.ShapeDtypeStruct((256,), jnp.int32)
  f32 = jax.ShapeDtypeStruct((), jnp.float32)

  def temp():
    common.compiled.cache_clear()
    fn = rar_sample.sampler_fn(model, cached=True, use_cfg=True, bucket=4)
    return fn.lower(params, labels, jax.random.key(0), f32, f32,
                    f32).compile().memory_analysis().temp_size_in_bytes
  assert len(ar.kv_chunks(model.seq_len, 2, 4)) == 4
  tables = temp()
  monkeypatch.setattr(rar_sample, "TABLE_BYTES", 0)   # per-step modulation
  per_step = temp()
  common.compiled.cache_clear()
  chunk = rar_sample.table_bytes(model, 256 + 1, 4)
  assert 0.5 * chunk < tables - per_step <= 2 * chunk


def test_rar_tables_count_one_devices_rows(rar, monkeypatch):
  """The table size limit counts the classes one device holds: a batch split
  8 ways keeps its tables under a limit the whole batch's would exceed, and
  draws the reference tokens."""
  model, params, labels, ref = rar                   # 8 classes, CFG
  key = jax.random.key(7)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.device_put(labels, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  assert common.batch_shards(sharded) == 8
  assert common.batch_shards(labels) == 1
  assert common.batch_shards(np.asarray(labels)) == 1
  real = rar_sample.table_bytes
  seen = []

  def spy(model, conditions, length, dtype=None):
    seen.append(conditions)
    return real(model, conditions, length, dtype)
  monkeypatch.setattr(rar_sample, "table_bytes", spy)
  # Fits 1 class + the null class over a chunk of 8; 8 + 1 would not.
  monkeypatch.setattr(rar_sample, "TABLE_BYTES", real(model, 2, 8))
  common.compiled.cache_clear()
  try:
    out = rar_sample.sample(model, params, sharded, key, bucket=8, **RAR_KW)
    assert seen and set(seen) == {2}, seen
    np.testing.assert_array_equal(out, ref)
    seen.clear()
    common.compiled.cache_clear()   # the AOT path, told the split up front
    run_batch_sharded(rar_sample.sampler_fn(model, bucket=8, batch_shards=8),
                      params, labels, key, 3.0, 1.0, 1.0)
    assert set(seen) == {2}, seen
  finally:
    common.compiled.cache_clear()


def _big_copies(hlo: str, min_elements: int):
  """copy / transpose ops inside loop bodies with >= min_elements elements."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= [a-z0-9]+\[([\d,]+)\][^ ]* (copy|transpose)\(", line)
    if m and "while/body" in line:
      if np.prod([int(v) for v in m.group(1).split(",")]) >= min_elements:
        found.append(line.strip()[:160])
  return found


def test_rar_decode_loop_does_not_copy_the_cache(rar):
  """The cache layout (B, H, M, D) feeds both attention matmuls in place: no
  per-step transpose or copy of anything cache-sized in the loop bodies."""
  model, params, labels, _ = rar
  fn = rar_sample.sampler_fn(model, cached=True, use_cfg=True, bucket=8)
  f32 = jnp.float32(1.0)
  hlo = fn.lower(params, labels, jax.random.key(0), f32, f32, f32).compile(
      ).as_text()
  rows, hd = 2 * labels.shape[0], test_rar.D
  assert "while/body" in hlo
  assert not _big_copies(hlo, rows * hd * 8)        # one head-set x 8 positions


def test_rar_bf16_decoding_matches_fp32_mostly(rar):
  model, params, labels, ref = rar
  out = rar_sample.sample(model, params, labels, jax.random.key(7),
                          dtype="bfloat16", **RAR_KW)
  assert out.dtype == jnp.int32 and out.shape == ref.shape
  same = float(np.mean(np.asarray(out) == np.asarray(ref)))
  print(f"RAR bf16 == fp32 tokens: {same:.3f}")
  assert same >= 0.5
  with pytest.raises(errors.ConfigError, match="bfloat16"):
    rar_sample.sample(model, params, labels, jax.random.key(7), dtype="int8",
                      **RAR_KW)


@pytest.fixture(scope="module")
def far():
  cfg = test_far.tiny_config()
  model, params = test_far.build(cfg)
  labels = jnp.arange(4) % test_far.C
  ref = far_sample.sample_uncached(model, params, labels, jax.random.key(3),
                                   **FAR_KW)
  return model, params, labels, ref


def test_far_chunked_cache_and_bf16(far):
  model, params, labels, ref = far
  key = jax.random.key(3)
  out = far_sample.sample(model, params, labels, key, bucket=5, **FAR_KW)
  np.testing.assert_array_equal(out, ref)
  bf16 = far_sample.sample(model, params, labels, key, dtype="bfloat16", **FAR_KW)
  same = float(np.mean(np.asarray(bf16) == np.asarray(ref)))
  print(f"FAR bf16 == fp32 codes: {same:.3f}")
  assert bf16.shape == ref.shape and same >= 0.5


def test_far_logits_stay_fp32_in_a_bf16_model(far):
  """The output heads compute in fp32 (as RAR's lm_head), so bf16 decoding
  keeps the fp32 logits its docstring promises: not all bf16 values."""
  model, params, labels, _ = far
  codes = jnp.zeros((2, model.num_codebooks, model.seq_len), jnp.int32)
  m16, p16 = common.for_decoding(model, params, "bfloat16")
  logits = jax.jit(m16.apply)({"params": p16}, codes, labels[:2])
  assert logits.dtype == jnp.float32
  as_bf16 = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(as_bf16 != np.asarray(logits)) > 0.5


def test_float32_decoding_of_a_float32_model_shares_its_program(rar):
  """dtype="float32" (the configs' setting) and None are one program for a
  float32 model: a driver and a test calling with either compile once."""
  model = rar[0]
  assert jnp.dtype(model.dtype) == jnp.float32
  fn = rar_sample.sampler_fn(model)
  assert rar_sample.sampler_fn(model, dtype="float32") is fn
  assert rar_sample.sampler_fn(model, dtype="bfloat16") is not fn
  m16 = model.clone(dtype=jnp.bfloat16)   # forced to fp32: its own program
  assert rar_sample.sampler_fn(m16, dtype="float32") is not rar_sample.sampler_fn(m16)
  # A dtype no sampler supports is refused on the reference path too.
  with pytest.raises(errors.ConfigError, match="float16"):
    rar_sample.sampler_fn(model, cached=False, dtype="float16")


def test_draw_marks_examples_with_nan_logits():
  """An example whose logits (either CFG half) hold NaN or +Inf draws -1,
  not code 0 as a categorical draw would; the others draw as before."""
  logits = jax.random.normal(jax.random.key(0), (8, 32))   # 4 examples x CFG
  key = jax.random.key(1)
  want = np.asarray(ar.draw(logits, key, 2.0, 1.0, True, top_k=5))
  # Rows [cond 0, uncond 0, cond 1, ...]: uncond 0 and cond 3 are broken.
  bad = logits.at[1, 3].set(jnp.nan).at[6, 0].set(jnp.inf)
  got = np.asarray(ar.draw(bad, key, 2.0, 1.0, True, top_k=5))
  assert got[0] == got[3] == -1 and want.min() >= 0
  np.testing.assert_array_equal(got[1:3], want[1:3])
  masked = logits.at[2, 7].set(-jnp.inf)   # a masked logit: no damage
  assert np.asarray(ar.draw(masked, key, 2.0, 1.0, True, top_k=5)).min() >= 0
  # Masked in both halves: guided -Inf - -Inf is NaN, which would be drawn.
  both = masked.at[3, 7].set(-jnp.inf)
  assert np.asarray(ar.draw(both, key, 2.0, 1.0, True))[1] == -1
  got = np.asarray(ar.draw(bad[::2], key, 2.0, 1.0, False))   # no CFG
  assert got[3] == -1 and got[:3].min() >= 0


def test_a_tiny_temperature_draws_the_most_likely_code():
  """Logits / 1e-38 overflowed to several +Inf, drawn as the lowest such
  code (code 0 in most rows of a RAR / FAR sample); relative to the row's
  largest logit the division gives the argmax, CFG-guided too."""
  logits = jnp.array([[5.0, 10.0, 1.0], [3.0, -2.0, 7.0]])
  for t in (1e-3, 1e-30, 1e-38, 1e-45):
    for seed in range(4):
      got = ar.draw(logits, jax.random.key(seed), 1.0, jnp.float32(t), False)
      assert got.tolist() == [1, 2], (t, seed)
  # CFG rows [cond, uncond]: guided = uncond + 16 (cond - uncond).
  pair = jnp.array([[20.0, 40.0, 30.0], [0.0, 30.0, 0.0]])
  guided = np.argmax(pair[1] + 16 * (pair[0] - pair[1]))
  assert ar.draw(pair, jax.random.key(0), 16.0, jnp.float32(1e-38),
                 True).tolist() == [guided]


def test_a_top_k_that_is_not_a_whole_number_is_refused():
  """From Python, top_k=1.7 ran as 1 and NaN failed in ``int()``."""
  for top_k in (1.7, float("nan"), "3"):
    with pytest.raises(errors.ConfigError, match=r"config.sample.top_k\) must "
                       r"be a whole number"):
      far_sample.check_filters(top_k, 1.0)
  far_sample.check_filters(5.0, 0.9)
  far_sample.check_filters(np.int64(5), 1.0)


def test_labels_sharded_on_a_mesh_with_explicit_axes_sample(rar):
  """Labels put on ``jax.make_mesh``'s default mesh (Explicit axes) failed
  in every sampler's class-table gather (``common.check_labels``, shared);
  they draw what host labels draw."""
  model, params, labels, ref = rar
  mesh = jax.make_mesh((8,), ("data",))
  assert mesh.axis_types[0] == jax.sharding.AxisType.Explicit
  sharded = jax.device_put(labels, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  out = rar_sample.sample(model, params, sharded, jax.random.key(7), **RAR_KW)
  np.testing.assert_array_equal(out, ref)


def test_rar_sampling_of_nan_weights_draws_no_code(rar):
  model, params, labels, _ = rar
  nan = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
  out = rar_sample.sample(model, nan, labels, jax.random.key(7), **RAR_KW)
  assert (np.asarray(out) == -1).all()


def test_each_rar_step_is_guided_by_its_own_power_cosine_scale():
  """``pick`` at step t guides with cfg_scale(t, L, g, pow), the official
  ``(1 - cos(pi (t / 256) ** pow)) / 2`` ramp (1d-tokenizer
  ``modeling/rar.py``): logits placed so the draw flips between the scales
  of steps t and t + 1. (The tiny models' conditional and null logits are
  too alike for a wrong scale to change their draws.)"""
  g, pw, length = 16.0, 2.75, 256
  for t in (100, 200):
    now, nxt = (float(rar_sample.cfg_scale(u, length, g, pw)) for u in (t, t + 1))
    assert 1.0 < now < nxt < g
    a = (now + nxt) / 2
    # cond [1, a], null [0, a]: guided = null + s (cond - null) = [s, a].
    logits = jnp.array([[1.0, a], [0.0, a]])
    draw = lambda step: int(rar_sample.pick(   # pylint: disable=cell-var-from-loop
        logits, step, jax.random.key(0), length, g, pw, 1e-4, True)[0])
    assert (draw(t), draw(t + 1)) == (1, 0), t


def test_a_shorter_rar_run_keeps_the_models_guidance_schedule(rar, monkeypatch):
  """Fewer tokens than the model's length: every step still takes its scale
  over the model's seq_len (a prefix of the full run, as the official t /
  256), in the cached sampler and the reference alike (traced only)."""
  model, params, labels, _ = rar
  lengths = []
  real = rar_sample.pick
  monkeypatch.setattr(rar_sample, "pick", lambda logits, step, rng, seq_len,
                      *rest, **kw: lengths.append(seq_len) or real(
                          logits, step, rng, seq_len, *rest, **kw))
  for cached, impl in ((True, rar_sample._cached_impl),      # pylint: disable=protected-access
                       (False, rar_sample._uncached_impl)):  # pylint: disable=protected-access
    opts = ar.options(rar_sample.Options, cached=cached, use_cfg=True,
                      seq_len=model.seq_len // 2)
    jax.eval_shape(lambda: impl(model, opts, params, labels,  # pylint: disable=cell-var-from-loop
                                jax.random.key(0), 3.0, 1.0, 1.0))
  assert lengths and set(lengths) == {model.seq_len}, lengths
