"""Equivariant generator: sizes, RoPE, window, training loss, rolling-cache
synthesis vs the full forward, 8x-width sampling, CFG ramp (tiny, CPU)."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import eq_common
from configs import eq_demo
from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models import eq_flow_head
from genvis_jax.models import eq_generator as eq_model
from genvis_jax.models.layers import attention as attn_lib
from genvis_jax.sample import common
from genvis_jax.sample import eq_generator as eq_sample
from genvis_jax.train.optimizers import decay_mask
from genvis_jax.train.tasks import eq as eq_tasks
from genvis_jax.train.tasks import get_task

C, L, K = 8, 6, 5          # token dim, training columns, classes


def tiny_config(**model):
  c = eq_demo.eq_generator_demo_config()
  c.model.update(dict(hidden_size=32, depth=2, num_heads=4, head_width=32,
                      head_depth=2, token_dim=C, num_classes=K,
                      num_cond_tokens=3, window=3, seq_len=L,
                      attn_dropout=0.1, proj_dropout=0.1, attn_impl="reference"))
  c.model.update(model)
  c.data.image_width = 16 * L   # L columns of the tokenizer's 16 px
  c.train.global_batch_size = 4
  c.optimizer.warmup_steps = 0
  return c


def np_init(abstract, seed=0, std=0.1):
  """Random parameters from shapes (numpy; zero-initialised heads get signal)."""
  rs = np.random.RandomState(seed)
  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    base = 1.0 if name == "scale" else 0.0
    return jnp.asarray(base + rs.normal(0.0, std, a.shape).astype(a.dtype))
  return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  abstract = jax.eval_shape(lambda k: models.init_params(cfg.model, k),
                            jax.random.key(0))
  return cfg, models.build(cfg.model), np_init(abstract)


# --- sizes ------------------------------------------------------------------------

def test_param_counts_of_official_sizes():
  exact = {"s": 127_311_488, "b": 295_586_560, "l": 644_496_128,
           "h": 1_203_206_912}
  for size, n in exact.items():
    cfg = eq_common.get_config(size).model
    shapes = jax.eval_shape(lambda k, cfg=cfg: models.init_params(cfg, k),
                            jax.random.key(0))
    assert models.count_params(shapes) == n, size
  # Spec: S 127M by instantiation, L 644M, H 1.2B; B is 294M in the paper,
  # the official architecture instantiates 295.6M (+0.5%).
  assert round(exact["s"] / 1e6) == 127 and round(exact["l"] / 1e6) == 644
  assert round(exact["h"] / 1e9, 1) == 1.2
  assert abs(exact["b"] / 294e6 - 1) < 0.01


def test_official_names_and_no_decay(tiny):
  _, _, params = tiny
  blk = params["encoder_blocks_1"]
  assert set(blk) == {"norm1", "attn", "cross_attn", "cross_norm",
                      "cross_cond_norm", "norm2", "mlp"}
  assert set(blk["cross_attn"]) == {"q", "k", "v", "out"}
  assert blk["attn"]["qkv"]["kernel"].shape == (32, 96)
  assert params["fake_latent"].shape == (1, 32)
  assert params["encoder_pos_embed_learned"].shape == (1, 3, 32)
  net = params["diffloss"]["net"]
  assert set(net) == {"time_embed", "cond_embed", "input_proj", "res_blocks_0",
                      "res_blocks_1", "final_layer"}
  assert set(net["res_blocks_0"]) == {"in_ln", "mlp_0", "mlp_2",
                                      "adaLN_modulation_1"}
  mask = decay_mask(params, eq_common.NO_DECAY)
  assert mask["fake_latent"] and mask["class_emb"]["embedding"]
  assert mask["encoder_blocks_0"]["attn"]["qkv"]["kernel"]
  assert not mask["encoder_blocks_0"]["attn"]["qkv"]["bias"]
  assert not mask["encoder_norm"]["scale"]
  assert not any(jax.tree_util.tree_leaves(mask["diffloss"]))


# --- pieces -----------------------------------------------------------------------

def test_rope_interleaved_pairs_match_numpy():
  d, pos = 8, np.array([0, 3, 17])
  x = np.random.RandomState(0).randn(1, 3, 2, d).astype(np.float32)
  cos, sin = attn_lib.rope_tables(pos, d, 10000.0)
  got = np.asarray(attn_lib.apply_rope(jnp.asarray(x), cos, sin))
  ref = np.empty_like(x)
  for n, p in enumerate(pos):
    for k in range(d // 2):
      a = p * 10000.0 ** (-2 * k / d)
      x0, x1 = x[:, n, :, 2 * k], x[:, n, :, 2 * k + 1]
      ref[:, n, :, 2 * k] = x0 * np.cos(a) - x1 * np.sin(a)
      ref[:, n, :, 2 * k + 1] = x1 * np.cos(a) + x0 * np.sin(a)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # Relative: <rope(q, i), rope(k, j)> depends on i - j only.
  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])
  def dot(i, j):
    ci, si = attn_lib.rope_tables(np.array([i]), d)
    cj, sj = attn_lib.rope_tables(np.array([j]), d)
    return float(jnp.sum(attn_lib.apply_rope(q, ci, si) * attn_lib.apply_rope(k, cj, sj)))
  np.testing.assert_allclose(dot(5, 2), dot(105, 102), rtol=1e-4)


def test_cfg_ramp_values():
  got = [float(eq_sample.cfg_scale(c, 16, 7.0)) for c in (0, 7, 15)]
  np.testing.assert_allclose(got, [1 + 6 / 16, 1 + 6 * 8 / 16, 7.0], rtol=1e-6)
  assert float(eq_sample.cfg_scale(3, 4, 1.0)) == 1.0


def test_timestep_embedding_is_cos_then_sin():
  e = np.asarray(eq_flow_head.timestep_embedding(jnp.array([0.0, 0.5]), 8))
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
  f = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(e[1], np.r_[np.cos(0.5 * f), np.sin(0.5 * f)],
                             rtol=1e-6)


# --- model ----------------------------------------------------------------------

def test_window_receptive_field_and_null_label(tiny):
  """One block: z[:, i] (predicts column i) sees columns i-window .. i-1."""
  cfg = tiny_config(depth=1)
  model = models.build(cfg.model)
  params = np_init(jax.eval_shape(lambda k: models.init_params(cfg.model, k),
                                  jax.random.key(0)))
  x = jax.random.normal(jax.random.key(0), (1, 10, C))
  labels = jnp.array([2])
  cond = jax.jit(lambda p, x, lab: model.apply({"params": p}, x, lab,
                                               method="condition"))
  z = cond(params, x, labels)
  j = 4
  z2 = cond(params, x.at[:, j].add(1.0), labels)
  changed = np.asarray(jnp.abs(z2 - z).max(-1)[0] > 1e-6)
  w = cfg.model.window
  np.testing.assert_array_equal(changed, [(j + 1 <= i <= j + w) for i in range(10)])
  # Null label = the learned fake latent, different from every class.
  z_null = cond(params, x, jnp.array([K]))
  assert float(jnp.abs(z_null - z).max()) > 1e-3


def test_training_loss_finite_and_decreasing():
  cfg = tiny_config(attn_dropout=0.0, proj_dropout=0.0)
  cfg.optimizer.lr = 3e-3
  task = get_task(cfg)
  params = np_init(jax.eval_shape(lambda k: nn.unbox(task.init_params(k)),
                                  jax.random.key(0)), std=0.05)
  batch = {"latents": jax.random.normal(jax.random.key(1), (4, L, C)),
           "label": jnp.array([0, 1, 2, 3])}
  opt = task.optimizers()["model"]

  @jax.jit
  def step(p, s, i):
    # Fixed noise (same key) so the loss is a deterministic function of p.
    g, m = task.grads({"model": p}, {}, batch, jax.random.key(7), i)
    u, s = opt.update(g["model"], s, p)
    return optax.apply_updates(p, u), s, m

  p, s = params["model"], opt.init(params["model"])
  losses = []
  for i in range(8):
    p, s, m = step(p, s, jnp.int32(i))
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses
  assert 0 <= float(m["shift"]) < cfg.flow.shift_num


def test_training_with_attention_dropout_says_the_kernel_is_not_used(caplog):
  """The windowed kernels take no dropout: with the official attn_dropout 0.1
  training attends densely whatever attn_impl says, and the log says so."""
  for impl, dropout, said in (("pallas_tpu", 0.1, True),
                              ("pallas_gpu", 0.1, True),
                              ("pallas_tpu", 0.0, False),
                              ("reference", 0.1, False)):
    caplog.clear()
    with caplog.at_level(logging.INFO):
      get_task(tiny_config(attn_impl=impl, attn_dropout=dropout))
    assert ("takes no attention dropout" in caplog.text) == said, impl
    assert (f"({impl}, config.model.attn_impl)" in caplog.text) == said


def test_training_grids_draw_as_the_sampling_driver(monkeypatch, caplog):
  """The sample grids go through the sampling driver's adapter
  (``eq_generator.generate``) with config.sample, dtype included, at the
  training width and at ``wide_columns``, for fixed evenly spread classes;
  without a tokenizer checkpoint they are off, with a warning (silent with
  image_every=0)."""
  cfg = tiny_config()
  cfg.sample.dtype = "bfloat16"
  cfg.sample.wide_columns = 4 * L
  task = get_task(cfg)
  with caplog.at_level(logging.WARNING):
    assert task.frozen_params() == {}
  assert "sample grids are OFF" in caplog.text
  caplog.clear()
  cfg_off = tiny_config()
  cfg_off.train.image_every = 0
  with caplog.at_level(logging.WARNING):
    assert get_task(cfg_off).frozen_params() == {}
  assert "sample grids are OFF" not in caplog.text

  # The sampler and decode stubbed: what the grids ask for, no compile.
  calls = []
  def fake_sample(model, params, labels, rng, **kw):
    del model, params, rng
    calls.append(dict(kw, labels=np.asarray(labels)))
    return jnp.zeros((labels.shape[0], kw["num_columns"], C))
  monkeypatch.setattr(eq_sample, "sample", fake_sample)
  task._decode = lambda p, lat: jnp.zeros((lat.shape[0], 4, 2 * lat.shape[1], 3))
  batch = {"latents": np.zeros((4, L, C), np.float32),
           "label": np.zeros((4,), np.int32)}
  out = task.visualize({"model": {}}, {"tokenizer": {}}, batch,
                       jax.random.key(0))
  assert {k: v.shape for k, v in out.items()} == {
      "samples": (8, 4, 2 * L, 3), "samples_wide": (8, 4, 8 * L, 3)}
  assert all(v.dtype == np.uint8 for v in out.values())
  assert [c["num_columns"] for c in calls] == [L, 4 * L]
  for c in calls:
    assert c["dtype"] == "bfloat16"
    assert (c["num_steps"], c["guidance_scale"]) == (
        cfg.sample.num_steps, cfg.sample.guidance_scale)
    np.testing.assert_array_equal(c["labels"], [0, 1, 2, 3, 4, 0, 1, 2])
  assert cfg.sample.num_columns == 4     # the config itself is not changed


def test_rope_shift_per_example_and_groups(tiny):
  """A (B,) shift rotates each row as that row alone with its scalar shift;
  rope_shifts gives one draw per run of ``group`` images, as the official
  code's one draw per GPU batch."""
  _, model, params = tiny
  x = jax.random.normal(jax.random.key(0), (2, L, C))
  labels = jnp.array([1, 3])
  cond = jax.jit(lambda p, x, lab, s: model.apply({"params": p}, x, lab,
                                                  shift=s, method="condition"))
  z = cond(params, x, labels, jnp.array([2, 9]))
  for i, s in enumerate((2, 9)):
    np.testing.assert_allclose(z[i:i + 1], cond(params, x[i:i + 1], labels[i:i + 1],
                                                jnp.int32(s)), atol=1e-6, rtol=0)
  assert float(jnp.abs(z[1] - cond(params, x, labels, jnp.int32(2))[1]).max()) > 1e-4

  s = np.asarray(eq_tasks.rope_shifts(jax.random.key(1), 200, 16, 64))
  assert s.shape == (200,) and s.dtype == np.int32
  assert s.min() >= 0 and s.max() < 16
  groups = [s[i:i + 64] for i in range(0, 200, 64)]    # the last one short
  assert all(len(set(g)) == 1 for g in groups)
  assert len({int(g[0]) for g in groups}) > 1
  one = np.asarray(eq_tasks.rope_shifts(jax.random.key(1), 200, 16, 1))
  assert len(set(one)) == 16                             # one per image


def test_a_rope_shift_moves_the_training_positions_forward(tiny, monkeypatch):
  """Training rotates column i at position i + shift (official
  generator/equ_modeling.py: t = arange(seq_len) + bias, bias = randint(0,
  shift_num)); synthesis starts at 0, so the positions a wide image reaches
  are ones training saw. A negated shift passed the per-example test above
  (both sides negate together)."""
  _, model, params = tiny
  seen, tables = [], eq_model.rope_tables
  monkeypatch.setattr(eq_model, "rope_tables",
                      lambda pos, *a, **k: seen.append(pos) or tables(pos, *a, **k))
  x = jnp.zeros((2, L, C))
  positions = jax.jit(lambda p: seen.clear() or (model.apply(
      {"params": p}, x, jnp.array([1, 3]), shift=jnp.array([3, 7]),
      method="condition"), seen[-1])[1])(params)
  np.testing.assert_array_equal(positions, np.arange(L)[None] + np.array([[3], [7]]))


def test_layer_norm_epsilons_are_the_officials(tiny):
  """generator/equ_modeling.py: the blocks, z_proj_ln and encoder_norm use
  eps 1e-6 (partial(nn.LayerNorm, eps=1e-6)), the cross-attention norms
  PyTorch's default 1e-5; diffloss.py's head 1e-6. The parity tests' unit-scale
  activations cannot tell them apart, so the epsilons are read off the
  modules (abstract evaluation: no compile)."""
  cfg, model, params = tiny
  eps = {}

  def grab(f, args, kwargs, ctx):
    if isinstance(ctx.module, nn.LayerNorm):
      eps[ctx.module.scope.path] = ctx.module.epsilon
    return f(*args, **kwargs)

  x = jnp.zeros((1, L, C))
  with nn.intercept_methods(grab):
    jax.eval_shape(lambda p: model.apply({"params": p}, x, jnp.array([0]),
                                         jnp.zeros((1, 1, L, C)),
                                         jnp.zeros((1, 1, L))), params)
  cross = {p for p in eps if p[-1] in ("cross_norm", "cross_cond_norm")}
  assert len(cross) == 2 * cfg.model.depth and len(eps) > len(cross) + 4
  assert all(eps[p] == 1e-5 for p in cross)
  assert all(eps[p] == 1e-6 for p in set(eps) - cross), eps


def test_training_forward_interpolates_data_to_noise_with_dropout_on(tiny):
  """The head sees x_t = t * noise + (1 - t) * data (official
  diffusion/flows.py: z_t = t z1 + (1 - t) z0, z1 the noise), the path the
  target noise - data and the sampler's t = 1 -> 0 integration assume;
  t = 0.5 everywhere could not tell the two directions apart."""
  cfg, model, params = tiny
  x = jax.random.normal(jax.random.key(0), (2, L, C))
  noise = jax.random.normal(jax.random.key(1), (2, 2, L, C))
  t = jax.random.uniform(jax.random.key(4), (2, 2, L))

  def grab(f, args, kwargs, ctx):
    if ctx.method_name == "velocity":
      seen.append(args[0])
    return f(*args, **kwargs)

  @jax.jit
  def f(p, k):
    with nn.intercept_methods(grab):
      v = model.apply({"params": p}, x, jnp.array([0, K]), noise, t, train=True,
                      shift=3, rngs={"dropout": k})[0]
    return v, seen.pop()

  seen = []
  (v1, x_t), (v2, _) = f(params, jax.random.key(2)), f(params, jax.random.key(3))
  np.testing.assert_allclose(x_t, t[..., None] * noise + (1 - t[..., None]) * x[:, None],
                             rtol=1e-6, atol=1e-6)
  assert v1.shape == (2, 2, L, C) and np.all(np.isfinite(v1))
  assert float(jnp.abs(v1 - v2).max()) > 0            # dropout is on


# --- synthesis ---------------------------------------------------------------------

def test_rolling_cache_synthesis_equals_full_forward(tiny):
  """Same key: the cached sampler feeds the head exactly the conditioning
  vectors of the full windowed forward, and returns the same latents."""
  _, model, params = tiny
  labels, key = jnp.array([1, 4]), jax.random.key(3)
  kw = dict(num_columns=2 * L, guidance_scale=3.0, num_steps=4, return_conditions=True)
  lat, z = eq_sample.sample(model, params, labels, key, **kw)
  lat_ref, z_ref = eq_sample.sample_uncached(model, params, labels, key, **kw)
  assert lat.shape == (2, 2 * L, C) and z.shape == (4, 2 * L, 32)
  np.testing.assert_allclose(z, z_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lat, lat_ref, atol=1e-5, rtol=0)
  # And the full forward over the finished sequence gives the same vectors
  # (rows: each example's cond, then its uncond).
  full = jax.jit(lambda p, x, lab: model.apply({"params": p}, x, lab,
                                               method="condition"))(
      params, jnp.repeat(lat, 2, axis=0), common.cfg_labels(labels, K))
  np.testing.assert_allclose(z, full, atol=1e-5, rtol=0)
  assert float(jnp.abs(z[0::2] - z[1::2]).max()) > 1e-3   # cond != uncond


def test_eight_times_training_width(tiny):
  _, model, params = tiny
  lat = eq_sample.sample(model, params, jnp.array([0, 2]), jax.random.key(4),
                         num_columns=8 * L, guidance_scale=1.0, num_steps=3)
  assert lat.shape == (2, 8 * L, C) and np.all(np.isfinite(lat))
  # The cache is constant-size: its leaves do not depend on the width.
  _, cache = model.apply({"params": params}, jnp.array([0]), method="prefill")
  assert cache["layers"][0]["k"].shape == (1, 3, 4, 8)


def test_sampler_rejects_bad_arguments(tiny):
  _, model, params = tiny
  with pytest.raises(ValueError, match="num_columns"):
    eq_sample.sample(model, params, jnp.array([0]), jax.random.key(0),
                     num_columns=0)
  with pytest.raises(ValueError, match="1-D"):
    eq_sample.sample(model, params, jnp.zeros((1, 1), jnp.int32),
                     jax.random.key(0), num_columns=2)
  with pytest.raises(ValueError, match=rf"labels \[{K + 1}\] are not classes"):
    eq_sample.sample(model, params, jnp.array([K + 1]), jax.random.key(0),
                     num_columns=2)
  with pytest.raises(ConfigError, match="guidance_scale=inf .*a finite"):
    eq_sample.sample(model, params, jnp.array([0]), jax.random.key(0),
                     num_columns=2, guidance_scale=float("inf"))


def test_latents_against_the_config_raise_config_error(tiny):
  """Latents of another width than config.model.token_dim: a ConfigError
  naming the key and the width that fits; another layout: ValueError."""
  _, model, params = tiny
  cond = lambda x: model.apply({"params": params}, x,
                               jnp.zeros((1,), jnp.int32), method="condition")
  with pytest.raises(ConfigError, match=rf"config.model.token_dim={C}: set "
                     rf"config.model.token_dim={C + 1}"):
    cond(jnp.zeros((1, L, C + 1)))
  with pytest.raises(ValueError, match=rf"latents must be \(B, L, {C}\)") as e:
    cond(jnp.zeros((L, C)))
  assert not isinstance(e.value, ConfigError)


def test_logical_axes_map_to_the_mesh():
  """Every parameter's logical names resolve under the project rules."""
  from configs import base
  from genvis_jax.core import sharding as shd
  cfg = tiny_config()
  boxed = jax.eval_shape(lambda k: models.init_params(cfg.model, k, boxed=True),
                         jax.random.key(0))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sh = shd.tree_shardings(boxed, mesh, base.DEFAULT_RULES)
  assert len(jax.tree_util.tree_leaves(sh)) == len(jax.tree_util.tree_leaves(
      nn.unbox(boxed)))


def test_official_generator_parity():
  """Conditioning vectors (class and fake-latent), head velocity and one CFG
  Euler column against the official PyTorch model (fixture)."""
  from tests.eq_parity import FIXTURE, fixture_params
  f = np.load(FIXTURE)
  cfg = ml_collections.ConfigDict(dict(
      name="eq_generator", hidden_size=32, depth=2, num_heads=4, head_width=24,
      head_depth=2, token_dim=8, num_classes=5, num_cond_tokens=3, window=3,
      seq_len=10))
  params = fixture_params(f, "gen/")
  abstract = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.key(0))
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)
  assert shapes(params) == shapes(abstract)
  model = models.build(cfg)
  lat, labels = jnp.asarray(f["gen/latents"]), jnp.asarray(f["gen/labels"])

  @jax.jit
  def run(params):
    cond = lambda lab: model.apply({"params": params}, lat, lab, method="condition")
    zc, zu = cond(labels), cond(jnp.full_like(labels, 5))
    v = model.apply({"params": params}, jnp.asarray(f["gen/x_t"]),
                    jnp.asarray(f["gen/t"]), zc.reshape(20, -1), method="velocity")
    vel = lambda x, t, z: model.apply({"params": params}, x, t, z,
                                      method="velocity")
    col = eq_sample.euler_flow(vel, common.cfg_rows(zc[:, 4], zu[:, 4]),
                               jnp.asarray(f["gen/noise"]), 2.5, 6, True)
    return zc, zu, v, col

  zc, zu, v, col = run(params)
  rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
  assert rel(zc, f["gen/z_cond"]) < 1e-5
  assert rel(zu, f["gen/z_uncond"]) < 1e-5
  assert rel(v, f["gen/velocity"]) < 1e-5
  assert rel(col, f["gen/column4_cfg2.5_euler6"]) < 1e-5


def test_a_seq_len_other_than_the_training_columns_is_refused():
  """The weights do not depend on seq_len (RoPE): --config.model.seq_len=9
  trained on the data's 4 columns without a word."""
  from configs import eq_s   # pylint: disable=import-outside-toplevel
  from genvis_jax.errors import ConfigError   # pylint: disable=import-outside-toplevel
  from genvis_jax.train import checks   # pylint: disable=import-outside-toplevel
  config = eq_s.get_config("runlocal")
  checks.check_token_width(config, get_task(config))
  config.model.seq_len = 9
  with pytest.raises(ConfigError, match=r"^config.model.seq_len=9, but the "
                     r"training images are 4 columns .*--config.model.seq_len"
                     r"=4, or the data width \(--config.data.image_width=144"):
    checks.check_token_width(config, get_task(config))
