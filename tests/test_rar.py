"""RAR generator, training task and samplers on a tiny model (CPU, < 1 min)."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from configs import rar_common
from genvis_jax import models
from genvis_jax.models.rar import permute, position_embeddings
from genvis_jax.sample import ar
from genvis_jax.sample import common
from genvis_jax.sample import rar as rar_sample
from genvis_jax.train.optimizers import decay_mask, param_path
from genvis_jax.train.tasks import get_task
from genvis_jax.train.tasks import rar as rar_task
from tests.sharding_checks import run_batch_sharded

V, C, L, D, H = 32, 10, 16, 64, 4


def tiny_config(**model):
  c = rar_common.get_config("b")
  c.model.update(dict(hidden_size=D, depth=2, num_heads=H, mlp_dim=4 * D,
                      codebook_size=V, num_classes=C, seq_len=L, max_pos=40,
                      num_timesteps=30, dtype="float32"))
  c.model.update(model)
  c.train.global_batch_size = 8
  return c


def jitter(params, key, std=0.05):
  """Adds noise so zero-initialised adaLN/cls params do something."""
  leaves, tdef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tdef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  model = models.build(cfg.model)
  params = jax.jit(lambda k: jitter(models.init_params(cfg.model, k),
                                   jax.random.fold_in(k, 1)))(jax.random.key(0))
  return cfg, model, params


# --- numpy reference of the whole forward pass for one sample ----------------
def _ln(x, scale=None, bias=None, eps=1e-6):
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return y if scale is None else y * scale + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def _lin(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def reference_forward(p, tokens, label, order):
  """Straight re-implementation: (L,) tokens, order -> (L + 1, V) logits."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  emb = p["embeddings"]["embedding"]
  n = len(tokens)
  seq = [p["cls_token"][0, 0], emb[V + 1 + label]] + [emb[tokens[o]] for o in order]
  x = np.stack(seq)
  pos, ta = p["pos_embed"][0], p["target_aware_pos_embed"][0]
  for i in range(n + 2):
    x[i] += pos[i] if i < 2 else pos[2 + order[i - 2]]
    if 1 <= i <= n:  # token i predicts the token at order[i - 1]
      x[i] += ta[2 + order[i - 1]]
  c = emb[V + 1 + label] + p["timesteps_embeddings"][0, :n + 2]
  hd = D // H
  for b in range(2):
    bp = p[f"blocks_{b}"]
    sh1, sc1, g1, sh2, sc2, g2 = np.split(_lin(_silu(c), bp["adaLN_modulation"]), 6, -1)
    h = _ln(x, bp["norm1"]["scale"], bp["norm1"]["bias"]) * (1 + sc1) + sh1
    qkv = _lin(h, bp["attn"]["qkv"]).reshape(n + 2, 3, H, hd)
    q = _ln(qkv[:, 0], bp["attn"]["q_norm"]["scale"], bp["attn"]["q_norm"]["bias"])
    k = _ln(qkv[:, 1], bp["attn"]["k_norm"]["scale"], bp["attn"]["k_norm"]["bias"])
    out = np.zeros((n + 2, H, hd))
    for head in range(H):
      s = q[:, head] @ k[:, head].T / np.sqrt(hd)
      s = np.where(np.tril(np.ones_like(s)) > 0, s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (a / a.sum(-1, keepdims=True)) @ qkv[:, 2, head]
    x = x + g1 * _lin(out.reshape(n + 2, D), bp["attn"]["out"])
    h = _ln(x, bp["norm2"]["scale"], bp["norm2"]["bias"]) * (1 + sc2) + sh2
    h = _lin(h, bp["mlp"]["fc1"])
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = x + g2 * _lin(h, bp["mlp"]["fc2"])
  x, c = x[1:], c[1:]
  scale, shift = np.split(_lin(_silu(c), p["adaln_before_head"]["adaLN_modulation"]), 2, -1)
  return _lin(_ln(x) * (1 + scale) + shift, p["lm_head"])


def test_forward_shape_and_matches_reference(tiny):
  _, model, params = tiny
  tokens = jax.random.randint(jax.random.key(2), (2, L), 0, V)
  labels = jnp.array([3, C])  # a class and the null class
  orders = jnp.stack([jnp.arange(L), jax.random.permutation(jax.random.key(3), L)])
  fwd = jax.jit(model.apply)
  logits = fwd({"params": params}, tokens, labels, orders)
  assert logits.shape == (2, 1 + L, V) and logits.dtype == jnp.float32
  for i in range(2):
    ref = reference_forward(params, np.asarray(tokens[i]), int(labels[i]),
                            np.asarray(orders[i]))
    np.testing.assert_allclose(logits[i], ref, atol=2e-4, rtol=2e-4)
  raster = fwd({"params": params}, tokens, labels, None)
  np.testing.assert_allclose(raster[0], logits[0], atol=1e-6)
  assert not np.allclose(raster[1], logits[1])


def test_init_is_the_official_plain_normal():
  """RAR's init_weights: ``trunc_normal_(std=.02)`` keeps torch's default
  cut-offs a=-2, b=2 (absolute: 100 std), a plain N(0, 0.02), about 4.6% of
  the weights beyond 2 std; a cut at 2 std leaves none there."""
  cfg = tiny_config()
  params = jax.jit(lambda k: models.init_params(cfg.model, k))(jax.random.key(0))
  w = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)
                      if x.size >= 256 and np.std(x) > 0.005])
  assert w.size > 100_000
  assert abs(w.std() - 0.02) < 0.0005
  assert 0.04 < np.mean(np.abs(w) > 0.04) < 0.05
  assert np.abs(w).max() > 0.08


def test_position_embeddings_target_aware():
  pos = np.random.RandomState(0).randn(12, 3).astype(np.float32)
  ta = np.random.RandomState(1).randn(12, 3).astype(np.float32)
  order = np.array([[2, 0, 3, 1]])
  got = np.asarray(position_embeddings(jnp.asarray(pos), jnp.asarray(ta),
                                       jnp.asarray(order)))[0]
  np.testing.assert_allclose(got[0], pos[0])                 # cls: no target PE
  np.testing.assert_allclose(got[1], pos[1] + ta[2 + 2])     # class -> 1st target
  np.testing.assert_allclose(got[2], pos[2 + 2] + ta[2 + 0])  # img at 2 -> next 0
  np.testing.assert_allclose(got[4], pos[2 + 3] + ta[2 + 1])
  np.testing.assert_allclose(got[5], pos[2 + 1])              # last: no target
  x = jnp.arange(8).reshape(1, 4, 2)
  np.testing.assert_array_equal(permute(x, jnp.asarray(order))[0, :, 0],
                                [4, 0, 6, 2])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_kv_cache_matches_full_forward(tiny, remat):
  """Also with the blocks remat-wrapped (``train`` is a static argument
  there: the decode methods must pass it positionally)."""
  _, model, params = tiny
  model = model if remat == "none" else models.build(
      tiny_config(remat=remat).model)
  tokens = jax.random.randint(jax.random.key(4), (3, L), 0, V)
  labels = jnp.array([0, 7, C])
  full = jax.jit(model.apply)({"params": params}, tokens, labels)
  logits, state = jax.jit(lambda p: model.apply(
      {"params": p}, labels, method="prefill", mutable=["cache"]))(params)
  np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)

  @jax.jit
  def step(params, cache, tok, j):
    return model.apply({"params": params, "cache": cache}, tok, labels, j,
                       method="decode_step", mutable=["cache"])

  cache = state["cache"]
  for j in range(L):
    logits, state = step(params, cache, tokens[:, j], j)
    cache = state["cache"]
    np.testing.assert_allclose(logits, full[:, 1 + j], atol=1e-5)


def test_bf16_and_remat_forward(tiny):
  cfg, model, params = tiny
  tokens = jax.random.randint(jax.random.key(5), (2, L), 0, V)
  labels = jnp.array([1, 2])
  ref = jax.jit(model.apply)({"params": params}, tokens, labels)
  remat = models.build(tiny_config(remat="full").model)
  grad = lambda m: jax.jit(jax.grad(lambda p: m.apply(
      {"params": p}, tokens, labels).sum()))(params)
  np.testing.assert_allclose(grad(remat)["blocks_0"]["attn"]["qkv"]["kernel"],
                             grad(model)["blocks_0"]["attn"]["qkv"]["kernel"],
                             atol=1e-4)
  bf16 = models.build(tiny_config(dtype="bfloat16").model)
  out = jax.jit(bf16.apply)({"params": params}, tokens, labels)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_adaln_table_equals_per_sample_modulation(tiny):
  """The (class, position) table gives the same logits and gradients, with
  remat too, including null-class rows and random orders."""
  cfg, model, params = tiny
  b = 24                                    # > num_classes + 1: several per class
  tokens = jax.random.randint(jax.random.key(7), (b, L), 0, V)
  labels = jnp.arange(b) % (C + 1)          # includes the null class C
  orders = jax.vmap(lambda k: jax.random.permutation(k, L))(
      jax.random.split(jax.random.key(8), b))
  table = models.build(tiny_config(adaln_table=True, remat="full").model)

  def loss(m):
    return lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, tokens, labels,
                                             orders)))
  ref, g_ref = jax.jit(jax.value_and_grad(loss(model)))(params)
  out, g_out = jax.jit(jax.value_and_grad(loss(table)))(params)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for a, r in zip(jax.tree_util.tree_leaves(g_out),
                  jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train(tiny):
  _, model, params = tiny
  tokens = jnp.zeros((1, L), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32)
  apply = jax.jit(lambda p, k, train: model.apply(
      {"params": p}, tokens, labels, train=train, rngs={"dropout": k}),
      static_argnums=2)
  fwd = lambda k, train: apply(params, k, train)
  assert not np.allclose(fwd(jax.random.key(0), True), fwd(jax.random.key(1), True))
  np.testing.assert_array_equal(fwd(jax.random.key(0), False),
                                fwd(jax.random.key(1), False))


def test_cfg_scale_schedule():
  s = lambda t, pw: float(rar_sample.cfg_scale(t, 256, 16.0, pw))
  assert s(0, 2.75) == pytest.approx(1.0)        # t = 0-based step
  assert s(128, 1.0) == pytest.approx(8.5)       # halfway, pow 1
  assert s(0, 0.0) == pytest.approx(16.0)        # pow 0: constant g
  assert s(200, 0.0) == pytest.approx(16.0)
  expected = 1 + 15 * (1 - np.cos(np.pi * (100 / 256) ** 2.75)) / 2
  assert s(100, 2.75) == pytest.approx(expected, rel=1e-6)


def test_cfg_pick_combines_cond_and_null_rows():
  labels2 = common.cfg_labels(jnp.array([4, 7]), C)
  np.testing.assert_array_equal(labels2, [4, C, 7, C])
  cond, uncond = 5.0 * jnp.eye(V)[3], 5.0 * jnp.eye(V)[5]
  logits = jnp.stack([cond, uncond, uncond, cond])  # example 1 swapped
  draw = lambda g: np.asarray(rar_sample.pick(
      logits, 10, jax.random.key(0), L, g, 0.0, 0.05, True))
  np.testing.assert_array_equal(draw(3.0), [3, 5])   # guided towards cond
  np.testing.assert_array_equal(draw(-2.0), [5, 3])  # negative g: anti-guidance


def test_cached_sampler_equals_uncached_and_shards(tiny):
  _, model, params = tiny
  labels = jnp.arange(8) % C
  kw = dict(guidance_scale=3.0, guidance_pow=1.0, temperature=1.0)
  key = jax.random.key(7)
  cached = rar_sample.sample(model, params, labels, key, **kw)
  uncached = rar_sample.sample_uncached(model, params, labels, key, **kw)
  assert cached.shape == (8, L) and cached.dtype == jnp.int32
  assert int(cached.min()) >= 0 and int(cached.max()) < V
  np.testing.assert_array_equal(cached, uncached)
  assert len(np.unique(np.asarray(cached))) > 4  # actually sampled
  # Fewer tokens: the first ones of the full run (the guidance schedule runs
  # over the model's length, as the official t / 256).
  np.testing.assert_array_equal(
      rar_sample.sample(model, params, labels, key, seq_len=6, **kw),
      cached[:, :6])
  # Labels are checked where they live (a sharded array's shards), before
  # anything compiles; the null class C is allowed (unconditional).
  sharded = jax.device_put(jnp.array([0, 1, C, C + 3, 2, 3, -2, 4]),
                           jax.sharding.NamedSharding(
                               jax.make_mesh((8,), ("data",)),
                               jax.sharding.PartitionSpec("data")))
  with pytest.raises(ValueError, match=r"labels \[-2, 13\] are not classes"):
    rar_sample.sample(model, params, sharded, key, **kw)
  # No CFG path (g = 0) also agrees.
  kw0 = dict(guidance_scale=0.0, guidance_pow=0.0, temperature=0.9)
  np.testing.assert_array_equal(
      rar_sample.sample(model, params, labels, key, seq_len=6, **kw0),
      rar_sample.sample_uncached(model, params, labels, key, seq_len=6, **kw0))
  # The batch sharded over 8 devices along "data": each device draws its own
  # examples, the same tokens.
  out = run_batch_sharded(rar_sample.sampler_fn(model), params, labels, key,
                          3.0, 1.0, 1.0)
  np.testing.assert_array_equal(out, cached)


def test_sampler_rejects_bad_input(tiny):
  _, model, params = tiny
  with pytest.raises(ValueError, match="guidance_scale=nan .*a finite number; "
                     "0.0 means no guidance"):
    rar_sample.sample_uncached(model, params, jnp.zeros((2,), jnp.int32),
                               jax.random.key(0), guidance_scale=float("nan"),
                               guidance_pow=0.0, temperature=1.0)
  for pow_, temp, match in [(-1.0, 1.0, "guidance_pow=-1.0 .*>= 0"),
                            (float("nan"), 1.0, "guidance_pow=nan"),
                            (0.0, float("nan"), "temperature must be a finite"),
                            (0.0, 0.0, "temperature must be"),
                            # None / a string: no bare TypeError / ValueError
                            (None, 1.0, "guidance_pow=None must be a number"),
                            (0.0, "x", "temperature='x' must be a number")]:
    with pytest.raises(ValueError, match=match):
      rar_sample.sample_uncached(model, params, jnp.zeros((2,), jnp.int32),
                                 jax.random.key(0), guidance_scale=2.0,
                                 guidance_pow=pow_, temperature=temp)
  with pytest.raises(ValueError, match="seq_len"):
    rar_sample.sample(model, params, jnp.zeros((2,), jnp.int32), jax.random.key(0),
                      guidance_scale=1.0, guidance_pow=0.0, temperature=1.0,
                      seq_len=L + 1)


@pytest.mark.parametrize("size,millions", [("b", 260.9), ("l", 461.7),
                                           ("xl", 955.4), ("xxl", 1498.5)])
def test_paper_param_counts(size, millions):
  cfg = importlib.import_module(f"configs.rar_{size}").get_config()
  shapes = jax.eval_shape(lambda: models.init_params(cfg.model, jax.random.key(0)))
  assert round(models.count_params(shapes) / 1e6, 1) == millions
  assert cfg.task == "rar" and cfg.data.source == "tokens"


def test_weight_decay_groups(tiny):
  cfg, _, params = tiny
  mask = decay_mask(params, cfg.optimizer.no_decay)
  decayed = {param_path(path) for path, m in
             jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  per_block = ["adaLN_modulation/kernel", "attn/qkv/kernel", "attn/out/kernel",
               "mlp/fc1/kernel", "mlp/fc2/kernel"]
  expected = {"cls_token", "lm_head/kernel"} | {
      f"blocks_{i}/{n}" for i in range(2) for n in per_block}
  assert decayed == expected


def test_randomness_ratio():
  r = lambda s: float(rar_task.randomness_ratio(s, 125_000, 187_500))
  assert r(0) == 1.0 and r(125_000) == 1.0
  assert r(156_250) == pytest.approx(0.5)
  assert r(171_875) == pytest.approx(0.25)
  assert r(187_500) == 0.0 and r(249_999) == 0.0


def test_anneal_points_past_the_last_step_are_named(caplog):
  """``--config.train.num_steps`` shortened alone: the paper's anneal points
  (absolute steps) lie past the end, and the run never trains on the raster
  order it samples in."""
  import logging  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  cfg.train.update(num_steps=100, randomness_anneal_start=125,
                   randomness_anneal_end=200)
  with caplog.at_level(logging.WARNING):
    get_task(cfg)
  assert ("randomness_anneal_end=200 is past config.train.num_steps=100: the "
          "run ends on 100% random orders") in caplog.text
  assert "randomness_anneal_start=50 --config.train.randomness_anneal_end=75" in (
      caplog.text)


def test_sample_orders_and_label_dropout():
  key = jax.random.key(0)
  perm = np.asarray(rar_task.sample_orders(key, 16, L, 1.0))
  assert all(sorted(o) == list(range(L)) for o in perm)
  assert len({tuple(o) for o in perm}) == 16          # different per sample
  assert not (perm == np.arange(L)).all(1).any()
  raster = np.asarray(rar_task.sample_orders(key, 16, L, 0.0))
  assert (raster == np.arange(L)).all()
  half = np.asarray(rar_task.sample_orders(key, 2000, L, 0.5))
  assert 0.45 < 1 - (half == np.arange(L)).all(1).mean() < 0.55
  labels = jnp.arange(20_000) % C
  dropped = np.asarray(rar_task.drop_labels(key, labels, 0.1, C))
  assert abs((dropped == C).mean() - 0.1) < 0.01
  kept = dropped != C
  np.testing.assert_array_equal(dropped[kept], np.asarray(labels)[kept])


def test_task_loss_decreases():
  cfg = tiny_config()
  task = get_task(cfg)
  assert isinstance(task, rar_task.RARTask)
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(0))
  rng = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(rng.randint(0, 4, (8, L)), jnp.int32),
           "label": jnp.asarray(rng.randint(0, C, (8,)), jnp.int32)}
  opt = optax.adam(3e-3)
  opt_state = jax.jit(opt.init)(params)

  @jax.jit
  def step(params, opt_state, i):
    g, m = task.grads(params, {}, batch, jax.random.fold_in(jax.random.key(1), i), i)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, m

  losses = []
  for i in range(12):
    params, opt_state, m = step(params, opt_state, i)
    losses.append(float(m["loss"]))
  assert float(m["r"]) == 1.0 and 0.0 <= float(m["accuracy"]) <= 1.0
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_task_optimizer_and_image_writers(tmp_path):
  from PIL import Image
  from genvis_jax.sample import images
  cfg = tiny_config()
  task = get_task(cfg)
  shapes = jax.eval_shape(lambda: nn.unbox(task.init_params(jax.random.key(0))))
  opt = task.optimizers()["model"]
  jax.eval_shape(opt.init, shapes["model"])  # builds with the no-decay mask
  imgs = np.random.RandomState(0).randint(0, 255, (5, 8, 6, 3)).astype(np.uint8)
  # Ten square (or tall) images per row, five 2x-wide ones, one 8x- or
  # 16x-wide one: never a strip of ten wide images.
  assert [images.grid_columns(h, w) for h, w in
          ((256, 256), (32, 512), (256, 2048), (32, 64), (64, 32))] == \
      [10, 1, 1, 5, 10]
  path = images.save_grid(imgs, str(tmp_path / "grid.png"), ncols=3)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * 10 + 2, 3 * 8 + 2, 3)
  np.testing.assert_array_equal(grid[12:20, 2:8], imgs[3])
  npz = np.load(images.save_npz(str(tmp_path / "s.npz"), imgs, np.arange(5)))
  np.testing.assert_array_equal(npz["arr_0"], imgs)
  with pytest.raises(ValueError, match="uint8"):
    images.save_grid(imgs.astype(np.float32), str(tmp_path / "bad.png"))


def test_each_decode_step_draws_with_its_own_key():
  """Step t draws with ``fold_in(rng, t)``: one key for every step drew the
  256 tokens of an image from one noise, and the cached and uncached
  samplers the tests compare made the same mistake together."""
  key, flat = jax.random.key(0), jnp.zeros((4, V))
  codes = []
  for t in range(L):
    got = rar_sample.pick(flat, t, key, L, 1.0, 0.0, 1.0, False)
    want = ar.draw(flat, jax.random.fold_in(key, t), 1.0, 1.0, False)
    np.testing.assert_array_equal(got, want)
    codes.append(np.asarray(got))
  assert len({c.tobytes() for c in codes}) > L // 2


def test_ar_loss_scores_each_position_against_its_own_target():
  """Logits at position j (after the prefix) predict target j; the last
  position, which follows every target, is dropped. Off by one, the loss
  still fell."""
  t = jax.random.randint(jax.random.key(0), (2, L), 0, V)
  logits = 50.0 * jax.nn.one_hot(
      jnp.concatenate([t, jnp.zeros((2, 1), t.dtype)], 1), V)   # (B, 1+L, V)
  loss, acc = rar_task.ar_loss(logits, t)
  assert float(acc) == 1.0 and float(loss) < 1e-6


def test_training_scores_the_permuted_targets(tiny, monkeypatch):
  """A random-order step scores the tokens in that order (the paper's
  idea): with raster targets the loss still fell and every other test
  passed."""
  cfg, _, params = tiny
  task = get_task(cfg)
  seen = {}
  sample_orders = rar_task.sample_orders

  def orders(*args):
    seen["orders"] = sample_orders(*args)
    return seen["orders"]

  class Scored(Exception):
    pass

  def loss(logits, targets):   # the backward pass is not needed
    seen["targets"] = targets
    raise Scored

  monkeypatch.setattr(rar_task, "sample_orders", orders)
  monkeypatch.setattr(rar_task, "ar_loss", loss)
  rng = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(rng.randint(0, V, (4, L)), jnp.int32),
           "label": jnp.asarray(rng.randint(0, C, (4,)), jnp.int32)}
  with pytest.raises(Scored):   # step 0: random orders
    task.grads({"model": params}, {}, batch, jax.random.key(1), 0)
  o = np.asarray(seen["orders"])
  assert (o != np.arange(L)).any()
  np.testing.assert_array_equal(seen["targets"], permute(batch["tokens"], o))
