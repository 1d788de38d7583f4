"""Equivariant sampler speed paths (tiny, CPU): hoisted head modulations equal
the per-step head, stepwise chunks equal one jitted run, bf16 decoding stays
close to fp32, and the benchmark's byte accounting of the paper-size head."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import eq_common
from genvis_jax import models
from genvis_jax.core import sharding
from genvis_jax.errors import ConfigError, UserError
from genvis_jax.sample import common
from genvis_jax.sample import eq_generator as eq_sample
from genvis_jax.sample import sampler as sampler_lib
from tests import sample_common as sc
from tests.sharding_checks import run_batch_sharded
from tests.test_eq_generator import C, K, np_init, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(attn_dropout=0.0, proj_dropout=0.0)
  abstract = jax.eval_shape(lambda k: models.init_params(cfg.model, k),
                            jax.random.key(0))
  return models.build(cfg.model), np_init(abstract, std=0.2)


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location(
      "bench_eq_sampling", ROOT / "bench" / "bench_eq_sampling.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


LABELS, KW = jnp.array([1, 3]), dict(num_columns=6, guidance_scale=3.0,
                                     num_steps=3)


@pytest.fixture(scope="module")
def fp32_latents(tiny):
  model, params = tiny
  return eq_sample.sample(model, params, LABELS, jax.random.key(5), **KW)


def test_batch_sharded_sampling_keeps_each_device_on_its_examples(
    tiny, monkeypatch):
  model, params = tiny
  labels, key = jnp.arange(8) % K, jax.random.key(5)
  # The hoisted modulation chunks are sized by one device's head rows (its
  # example's cond and null rows), not by the global batch's 16.
  rows, real = [], eq_sample.steps_per_chunk
  monkeypatch.setattr(eq_sample, "steps_per_chunk",
                      lambda n, r, *a: rows.append(r) or real(n, r, *a))
  common.compiled.cache_clear()
  fn = eq_sample.sampler_fn(model, num_columns=KW["num_columns"],
                            num_steps=KW["num_steps"], batch_shards=8)
  latents, conds = run_batch_sharded(fn, params, labels, key,
                                     KW["guidance_scale"])
  assert set(rows) == {2}
  assert conds is None      # no conditions buffer unless asked for
  # One device's program multiplies 2 head rows, the unsharded one 16: on an
  # AVX2-only CPU XLA rounds those shapes differently (7e-6 apart after the
  # Euler steps); latents of a mixed-up example differ by O(1) (5.6 with the
  # labels reversed).
  np.testing.assert_allclose(
      latents, eq_sample.sample(model, params, labels, key, **KW),
      rtol=1e-5, atol=5e-5)


def test_steps_per_chunk_bounds_rows_in_the_fewest_balanced_chunks():
  assert eq_sample.steps_per_chunk(100, 2) == 100          # batch 1 with CFG
  assert eq_sample.steps_per_chunk(100, 32, 2048) == 50    # 2 chunks of <= 64
  assert eq_sample.steps_per_chunk(100, 128, 2048) == 15   # 7 of <= 16: 6 x 15 + 10
  assert eq_sample.steps_per_chunk(101, 2, 100) == 34      # a prime: 34, 34, 33
  assert eq_sample.steps_per_chunk(7, 4096, 2048) == 1
  np.testing.assert_array_equal(eq_sample.step_times(4), [1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("use_cfg,max_rows,steps,k", [
    (True, 2 * 4, 6, 2), (False, 10_000, 6, 6), (True, 3 * 4, 7, 3)])
def test_hoisted_modulations_equal_the_per_step_head(tiny, use_cfg, max_rows,
                                                     steps, k):
  """Chunks of 2 of 6 steps (CFG), all 6 at once (no CFG) and 3 + 3 + 1 of 7
  (a shorter last chunk) vs the official per-step loop over ``velocity``."""
  model, params = tiny
  b = 2
  rows = 2 * b if use_cfg else b
  z = jax.random.normal(jax.random.key(0), (rows, 32))
  noise = jax.random.normal(jax.random.key(1), (b, C))
  vel = lambda x, t, zz: model.apply({"params": params}, x, t, zz,
                                     method="velocity")

  @jax.jit
  def both(z, noise):
    ref = eq_sample.euler_flow(vel, z, noise, 2.5, steps, use_cfg)
    got = eq_sample.euler_flow_hoisted(model, params, z, noise, 2.5, steps,
                                       use_cfg, max_rows=max_rows)
    return ref, got

  ref, got = both(z, noise)
  assert eq_sample.steps_per_chunk(steps, rows, max_rows) == k
  assert float(jnp.abs(ref - noise).max()) > 0.1            # the head moved x
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(
      jnp.abs(ref).max()))


def test_stepwise_equals_one_jitted_run_and_per_step_head(tiny, fp32_latents):
  model, params = tiny
  labels, key, kw, whole = LABELS, jax.random.key(5), KW, fp32_latents
  per_step = eq_sample.sample(model, params, labels, key,
                              hoist_modulations=False, **kw)
  chunks = list(eq_sample.sample_stepwise(model, params, labels, key, chunk=2,
                                          **kw))
  assert [c for c, _ in chunks] == [2, 4, 6]
  np.testing.assert_array_equal(chunks[0][1][:, 2:], 0)       # not yet sampled
  np.testing.assert_allclose(chunks[-1][1], whole, rtol=0, atol=1e-6)
  np.testing.assert_allclose(per_step, whole, rtol=0, atol=1e-5)
  with pytest.raises(UserError, match="chunk"):
    eq_sample.sample_stepwise(model, params, labels, key, chunk=4, **kw)


def test_column_loop_has_no_conditional(tiny):
  """No ``lax.cond`` in the column loop: on GPU a conditional reads its
  predicate on the host, a sync per column (the last column's unused
  backbone step runs instead)."""
  model, params = tiny
  fn = eq_sample.sampler_fn(model, num_columns=6, num_steps=3)
  text = str(jax.make_jaxpr(fn)(params, LABELS, jax.random.key(5),
                                jnp.float32(3.0)))
  assert "scan[" in text and "cond[" not in text


def test_bf16_decoding_close_to_fp32(tiny, fp32_latents):
  """Parameters cast once to bf16, latents stay float32 and close to fp32."""
  model, params = tiny
  m16, p16 = common.for_decoding(model, params, "bfloat16")
  assert m16.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves(p16)} == {
      jnp.dtype(jnp.bfloat16)}
  nbytes = lambda t: sum(a.nbytes for a in jax.tree_util.tree_leaves(t))
  assert 2 * nbytes(p16) == nbytes(params)
  assert common.for_decoding(model, params, "float32") == (model, params)
  # "float32" forces fp32 on a model configured in bf16 (parity decoding);
  # "" keeps the configured dtype, as for RAR / FAR.
  assert common.for_decoding(m16, params, "float32")[0].dtype == jnp.float32
  assert common.for_decoding(m16, p16, "") == (m16, p16)
  # The caches hold bf16 keys and values (the norm before them returns
  # float32: a rolling cache made in its dtype doubled its bytes).
  _, cache = m16.apply({"params": p16}, jnp.asarray(LABELS), method="prefill")
  assert {a.dtype for a in jax.tree_util.tree_leaves(cache)} == {
      jnp.dtype(jnp.bfloat16)}
  labels, key, kw, lat32 = LABELS, jax.random.key(5), KW, fp32_latents
  lat16 = eq_sample.sample(model, params, labels, key, dtype="bfloat16", **kw)
  assert lat16.dtype == jnp.float32
  rel = float(jnp.abs(lat16 - lat32).max() / jnp.abs(lat32).max())
  # bf16 has an 8-bit mantissa (2^-9 = 0.2% per rounding): the samples move
  # by a few tenths of a percent up to a few percent, not by their scale.
  print(f"bf16 vs fp32 latents: max |diff| / max |fp32| = {rel:.2e}")
  assert 1e-5 < rel < 5e-2, rel
  with pytest.raises(UserError, match="dtype"):
    eq_sample.sample(model, params, labels, key, dtype="float16", **kw)


def test_bench_byte_accounting_of_eq_s(bench):
  """eq_s: the head is 59.4M parameters (238 MB fp32 read per Euler step),
  60% of it on the (t, z) path that the sampler hoists."""
  cfg = eq_common.get_config("s").model
  shapes = jax.eval_shape(lambda k: models.init_params(cfg, k),
                          jax.random.key(0))
  b = bench.byte_counts(shapes)
  m = models.build(cfg)              # every field, resolved
  w, d, depth, hid = m.head_width, m.token_dim, m.head_depth, m.hidden_size
  # Head re-stated from its layer list (weights + biases, LayerNorm scale/bias).
  block = (w * 3 * w + 3 * w) + 2 * (w * w + w) + 2 * w
  mod = depth * (w * 3 * w + 3 * w) + (w * 2 * w + 2 * w) + (
      256 * w + w + w * w + w) + (hid * w + w)
  head = depth * block + (w * 2 * w + 2 * w) + (w * d + d) + (
      256 * w + w + w * w + w) + (hid * w + w) + (d * w + w)
  assert b["head"] == 4 * head and round(head / 1e5) == 594
  assert b["head_mod"] == 4 * mod and b["head_x"] == 4 * (head - mod)
  # Transformer per column: z_proj, z_proj_ln, encoder_norm and per block
  # norm1, attn (qkv, out), cross_norm, cross_attn (q, out), norm2, mlp.
  col = (d * hid + hid) + 2 * hid + 2 * hid + cfg.depth * (
      2 * hid + (hid * 3 * hid + 3 * hid) + (hid * hid + hid) + 2 * hid
      + 2 * (hid * hid + hid) + 2 * hid + (hid * 4 * hid + 4 * hid)
      + (4 * hid * hid + hid))
  assert b["column"] == 4 * col
  assert bench.floor_bytes_per_column(shapes, 100, 2, False) == (
      100 * b["head"] + b["column"])


def test_counts_that_are_not_whole_numbers_are_refused(tiny):
  """A notebook's num_columns=2.7 drew 2 columns without a word."""
  model, params = tiny[:2]
  labels = jnp.zeros((1,), jnp.int32)
  for kw, name in ((dict(num_columns=2.7), "num_columns=2.7"),
                   (dict(num_columns=2, num_steps=3.5), "num_steps=3.5")):
    with pytest.raises(UserError, match=f"{name} must be a whole number"):
      eq_sample.sample(model, params, labels, jax.random.key(0), **kw)
  with pytest.raises(UserError, match=r"chunk must be a whole number >= 1 "
                     r"dividing num_columns \(3\); got 1.5"):   # not 1
    eq_sample.column_stepper(model, params, labels, jax.random.key(0),
                             num_columns=3, chunk=1.5)


def test_a_guidance_scale_below_one_is_warned_about(caplog):
  """RAR's 0.0 means no guidance; here 0 guides the last column to the
  unconditional draw, which a user moving from RAR got without a word."""
  import logging   # pylint: disable=import-outside-toplevel
  import ml_collections   # pylint: disable=import-outside-toplevel
  s = ml_collections.ConfigDict(dict(num_columns=4, num_steps=2,
                                     guidance_scale=1.0))
  with caplog.at_level(logging.WARNING):
    eq_sample.check_settings(s)
    assert not caplog.records
    s.guidance_scale = 0.0
    eq_sample.check_settings(s)
  assert "guidance_scale=0.0 is below 1.0" in caplog.text
  assert "1.0 means no guidance" in caplog.text


def test_each_column_starts_from_its_own_noise(monkeypatch, request):
  """Column c's flow starts from noise drawn with ``fold_in(rng, c)`` (the
  official draws fresh noise per token): with one key every column started
  from the same noise. The flow is replaced by its starting noise here."""
  cfg = tiny_config(attn_dropout=0.0, proj_dropout=0.0)
  abstract = jax.eval_shape(lambda k: models.init_params(cfg.model, k),
                            jax.random.key(0))
  model, params = models.build(cfg.model), np_init(abstract, std=0.2)
  monkeypatch.setattr(eq_sample, "euler_flow_hoisted",
                      lambda model, params, z, noise, *a, **k: noise)
  # The stand-in flow is traced into the cached program of these options:
  # no test before or after may share it.
  common.compiled.cache_clear()
  request.addfinalizer(common.compiled.cache_clear)
  out = np.asarray(eq_sample.sample(model, params, jnp.array([1, 3]),
                                    jax.random.key(5), num_columns=6,
                                    guidance_scale=3.0, num_steps=3))
  cols = np.moveaxis(out, -2, 1).reshape(out.shape[0], 6, -1)
  for a in range(6):
    for b in range(a):
      assert not np.allclose(cols[:, a], cols[:, b]), (a, b)


def test_a_sampler_takes_other_settings_on_the_weights_it_loaded(
    tiny, fp32_latents, monkeypatch):
  """colabs/equivariant_wide.ipynb built a sampler per width it drew: each
  call read the generator's and the tokenizer's weights again (seconds at
  paper size, and about 5k objects tensorstore 0.1.86 never frees per
  load). ``with_options`` draws with other ``config.sample`` settings on
  the weights already loaded, checked as the config's own."""
  model, params = tiny
  cfg = tiny_config(attn_dropout=0.0, proj_dropout=0.0)
  cfg.tokenizer.model.embed_dim = C
  loads = []
  monkeypatch.setattr(models, "load_params",
                      lambda mc, *a, **k: loads.append(mc.name) or params)
  monkeypatch.setattr(sampler_lib, "make_decode_fn",
                      lambda tok, mesh: sc.PassThroughDecoder)
  sampler, _ = sampler_lib.make_sample_fn(cfg,
                                     sharding.data_mesh(jax.devices()[:1]))
  columns = cfg.sample.num_columns
  wide = sampler.with_options(**KW)
  np.testing.assert_array_equal(
      wide(LABELS, jax.random.key(5)),
      fp32_latents / cfg.sample.latent_scale)
  assert loads == [cfg.model.name]            # the generator's, once
  assert sampler.options.num_columns == cfg.sample.num_columns == columns
  with pytest.raises(KeyError, match="num_colums"):
    sampler.with_options(num_colums=8)
  with pytest.raises(TypeError, match="num_columns"):
    sampler.with_options(num_columns="wide")
  with pytest.raises(ConfigError, match="num_columns=0"):
    sampler.with_options(num_columns=0)
  with pytest.raises(ConfigError, match="seed: settings of a mode=sample run"):
    sampler.with_options(seed=3)   # the key is the call's
