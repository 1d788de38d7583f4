"""FAR generator, training task and samplers on tiny models (CPU, < 1.5 min)."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import far_common, far_demo
from genvis_jax import models
from genvis_jax.errors import ConfigError
from genvis_jax.models.far import ffn_hidden_dim
from genvis_jax.models.layers import attention as attn_lib
from genvis_jax.sample import ar
from genvis_jax.sample import common
from genvis_jax.sample import far as far_sample
from genvis_jax.train.optimizers import decay_mask, param_path
from genvis_jax.train.tasks import get_task
from genvis_jax.train.tasks import far as far_task
from tests.sharding_checks import run_batch_sharded

V, C, G, D, H = 32, 10, 4, 32, 2
N = G * G


def tiny_config(variant="dual", **model):
  c = far_common.get_config("b", variant)
  c.model.update(dict(codebook_size=V, num_classes=C, grid=G, dim=D, n_layer=2,
                      n_head=H, n_head_layer=2, multiple_of=32, dtype="float32"))
  c.model.update(model)
  c.train.global_batch_size = 4
  return c


def build(cfg, seed=0):
  """Model and random params (no init compile): norm scales 1 + noise, other
  leaves noise, so the zero-initialised output heads do something."""
  model = models.build(cfg.model)
  shapes = jax.eval_shape(lambda: models.init_params(cfg.model, jax.random.key(0)))
  rs = np.random.RandomState(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          (param_path(path).endswith("scale") + 0.05 * rs.randn(*s.shape)), s.dtype),
      shapes)
  return model, params


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  return (cfg, *build(cfg))


# --- numpy reference (float64) of the official forward for one sample ---------
def _rope_rows(count):
  """Rows 0..count-1 of LlamaGen's 2D table: row 0 zeros, row 1+p raster p."""
  hd = D // H
  freqs = 10000.0 ** (-np.arange(0, hd // 2, 2) / (hd // 2))
  rows = [np.zeros((hd // 2, 2))]
  for p in range(count - 1):
    ang = np.concatenate([(p // G) * freqs, (p % G) * freqs])
    rows.append(np.stack([np.cos(ang), np.sin(ang)], -1))
  return np.stack(rows)


def _rot(x, rows):  # x (S, H, hd)
  xs = x.reshape(*x.shape[:-1], -1, 2)
  c, s = rows[:, None, :, 0], rows[:, None, :, 1]
  return np.stack([xs[..., 0] * c - xs[..., 1] * s,
                   xs[..., 1] * c + xs[..., 0] * s], -1).reshape(x.shape)


def _rms(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * scale


def _block(bp, x, rows):
  s, hd = len(x), D // H
  q, k, v = np.split(_rms(x, bp["attention_norm"]["scale"])
                     @ bp["attention"]["qkv"]["kernel"], 3, -1)
  q, k = _rot(q.reshape(s, H, hd), rows), _rot(k.reshape(s, H, hd), rows)
  att = np.einsum("nhd,mhd->hnm", q, k) / np.sqrt(hd)
  att = np.where(np.tril(np.ones((s, s))) > 0, att, -np.inf)
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = np.einsum("hnm,mhd->nhd", att, v.reshape(s, H, hd)).reshape(s, D)
  x = x + o @ bp["attention"]["out"]["kernel"]
  ff = bp["feed_forward"]
  h = _rms(x, bp["ffn_norm"]["scale"])
  a = h @ ff["fc1_g"]["kernel"]
  return x + ((a / (1 + np.exp(-a))) * (h @ ff["fc1_x"]["kernel"])) @ ff["fc2"]["kernel"]


def reference_forward(p, codes, label, n_layer=2, n_head_layer=2):
  """codes (k, N), label -> (k, N, V) logits, written from the official code."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  k = codes.shape[0]
  embs = [p[f"tok_embeddings_{i + 1}"]["embedding"][codes[i]] for i in range(k)]
  agg = p["aggregation_layer"]
  tok = np.concatenate(embs, -1) @ agg["kernel"] + agg["bias"]
  x = np.concatenate([p["cls_embedding"]["embedding_table"]["embedding"][[label]],
                      tok[:-1]])
  rows = _rope_rows(N + 1)
  for i in range(n_layer):
    x = _block(p[f"layers_{i}"], x, rows[:N])
  out = np.zeros((k, N, V))
  for t in range(N):
    y = np.stack([x[t]] + [e[t] for e in embs[:k - 1]])
    for i in range(n_head_layer):
      y = _block(p[f"ar_head_{i}"], y, rows[:k])
    y = _rms(y, p["norm"]["scale"])
    for i in range(k):
      out[i, t] = y[i] @ p[f"output_{i + 1}"]["kernel"]
  return out


@pytest.mark.parametrize("variant", ["dual", "triple"])
def test_forward_matches_reference(tiny, variant):
  cfg, model, params = tiny if variant == "dual" else (None, *build(
      tiny_config("triple"), 1))
  k = model.num_codebooks
  codes = jax.random.randint(jax.random.key(2), (2, k, N), 0, V)
  labels = jnp.array([3, C])  # a class and the null class
  logits = jax.jit(model.apply)({"params": params}, codes, labels)
  assert logits.shape == (2, k, N, V) and logits.dtype == jnp.float32
  for b in range(2):
    ref = reference_forward(params, np.asarray(codes[b]), int(labels[b]))
    np.testing.assert_allclose(logits[b], ref, atol=1e-4, rtol=1e-4)


def test_output_layout_is_causal_per_subtoken(tiny):
  """logits[:, i, t] sees codes[:, :, <t] and codes[:, <i, t], nothing else."""
  _, model, params = tiny
  fwd = jax.jit(model.apply)
  codes = jax.random.randint(jax.random.key(3), (1, 2, N), 0, V)
  labels = jnp.array([4])
  base = fwd({"params": params}, codes, labels)
  t = 5
  vis = fwd({"params": params}, codes.at[0, 0, t].add(1), labels)
  sem = fwd({"params": params}, codes.at[0, 1, t].add(1), labels)
  same = lambda a, b: np.allclose(a, b, atol=1e-6)
  assert same(vis[:, 0, :t + 1], base[:, 0, :t + 1])  # own sub-token: no leak
  assert same(vis[:, 1, :t], base[:, 1, :t])
  assert not same(vis[:, 1, t], base[:, 1, t])        # head sees vis_t for sem_t
  assert not same(vis[:, :, t + 1], base[:, :, t + 1])
  assert same(sem[:, :, :t + 1], base[:, :, :t + 1])   # sem_t feeds only t + 1
  assert not same(sem[:, :, t + 1], base[:, :, t + 1])


def cached_logits(model, params, codes, labels):
  """Teacher-forced logits (B, k, N, V) through prefill/backbone_step/head_step."""
  b, k, n = codes.shape

  def head(cache, h, t):
    out = []
    for i in range(k):
      prev = None if i == 0 else codes[:, i - 1, t]
      lg, st = model.apply({"params": params, "cache": cache}, h, prev, i,
                           method="head_step", mutable=["cache"])
      cache = st["cache"]
      out.append(lg)
    return cache, jnp.stack(out, 1)

  h, st = model.apply({"params": params}, labels, method="prefill",
                      mutable=["cache"])
  cache, l0 = head(st["cache"], h, 0)
  logits = jnp.zeros((b, k, n, model.codebook_size)).at[:, :, 0].set(l0)

  def body(t, carry):
    cache, logits = carry
    h, st = model.apply({"params": params, "cache": cache}, codes[:, :, t - 1],
                        t - 1, method="backbone_step", mutable=["cache"])
    cache, lt = head(st["cache"], h, t)
    return cache, logits.at[:, :, t].set(lt)

  return jax.lax.fori_loop(1, n, body, (cache, logits))[1]


def test_kv_cache_matches_full_forward(tiny):
  _, model, params = tiny
  codes = jax.random.randint(jax.random.key(4), (3, 2, N), 0, V)
  labels = jnp.array([0, 7, C])
  full = jax.jit(model.apply)({"params": params}, codes, labels)
  cached = jax.jit(cached_logits, static_argnums=0)(model, params, codes, labels)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)


def test_cached_sampler_equals_reference_and_shards(tiny):
  _, model, params = tiny
  labels = jnp.arange(8) % C
  key = jax.random.key(7)
  kw = dict(guidance_scale=2.0, temperature=1.0)
  cached = far_sample.sample(model, params, labels, key, **kw)
  ref = far_sample.sample_uncached(model, params, labels, key, **kw)
  assert cached.shape == (8, 2, N) and cached.dtype == jnp.int32
  assert int(cached.min()) >= 0 and int(cached.max()) < V
  np.testing.assert_array_equal(cached, ref)
  assert len(np.unique(np.asarray(cached))) > 8  # actually sampled
  maps = far_sample.to_code_maps(cached, G)          # the FQ decode input
  assert len(maps) == 2 and maps[1].shape == (8, G, G)
  np.testing.assert_array_equal(maps[1][:, 2, 3], cached[:, 1, 2 * G + 3])
  # No CFG (scale 1), top-k and top-p filters: cached still equals reference.
  kw2 = dict(guidance_scale=1.0, temperature=0.8, top_k=6, top_p=0.9)
  np.testing.assert_array_equal(
      far_sample.sample(model, params, labels[:2], key, **kw2),
      far_sample.sample_uncached(model, params, labels[:2], key, **kw2))
  # The batch sharded over 8 devices along "data": each device draws its own
  # examples, the same codes.
  np.testing.assert_array_equal(run_batch_sharded(
      far_sample.sampler_fn(model), params, labels, key, 2.0, 1.0), cached)


def test_cfg_pairs_and_guidance():
  np.testing.assert_array_equal(common.cfg_labels(jnp.array([4, 7]), C),
                                [4, C, 7, C])
  logits = jnp.array([[1.0, 0.0], [3.0, 0.0]])  # one example: cond, uncond rows
  pick = lambda g: int(far_sample.pick(
      logits, jax.random.key(0), 0, 0, g, 1e-3, True, 0, 1.0)[0])
  assert pick(1.0) == 0 and pick(2.0) == 1   # 3 + 2 * (1 - 3) = -1 < 0


def test_top_k_top_p_filter():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
  keep = lambda **kw: np.isfinite(np.asarray(ar.top_k_top_p(logits, **kw)))
  np.testing.assert_array_equal(keep(top_k=2)[0], [1, 0, 1, 0])
  assert keep(top_k=2)[1].all()                      # ties at the k-th are kept
  # Nucleus: keep until the cumulative probability first exceeds top_p.
  np.testing.assert_array_equal(keep(top_p=0.7)[0], [1, 0, 1, 0])
  np.testing.assert_array_equal(keep(top_p=0.4)[0], [1, 0, 0, 0])
  np.testing.assert_array_equal(keep(top_p=0.85)[0], [1, 0, 1, 1])
  assert keep(top_k=0, top_p=1.0).all()
  # Many rows: the official filter's formula (sort, shifted cumulative mask,
  # scatter back), computed in numpy.
  x = np.asarray(jax.random.normal(jax.random.key(1), (6, 40))) * 2.0
  order = np.argsort(-x, axis=-1, kind="stable")
  srt = np.take_along_axis(x, order, axis=-1)
  prob = np.exp(srt - srt.max(-1, keepdims=True))
  cum = np.cumsum(prob / prob.sum(-1, keepdims=True), axis=-1)
  drop_sorted = np.concatenate([np.zeros((6, 1), bool), cum[:, :-1] > 0.6], -1)
  drop = np.zeros_like(drop_sorted)
  np.put_along_axis(drop, order, drop_sorted, axis=-1)
  np.testing.assert_array_equal(
      np.isfinite(np.asarray(ar.top_k_top_p(jnp.asarray(x), top_p=0.6))), ~drop)


def test_sampler_rejects_bad_input(tiny):
  _, model, params = tiny
  with pytest.raises(ValueError, match="1-D"):
    far_sample.sample(model, params, jnp.zeros((2, 1), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="top_p"):
    far_sample.sample(model, params, jnp.zeros((2,), jnp.int32), jax.random.key(0),
                      top_p=0.0)
  # Official FAR guides only above 1: 0.5 would draw exactly as 1.0.
  for bad in (0.5, 0.0, float("nan")):
    with pytest.raises(ConfigError, match=rf"guidance_scale={bad} .*at least "
                       r"1.0; 1.0 means no guidance"):
      far_sample.sample_uncached(model, params, jnp.zeros((2,), jnp.int32),
                                 jax.random.key(0), guidance_scale=bad)
  # A class past the table (or negative) would give garbage images silently.
  for bad in (C + 1, -1):
    with pytest.raises(ValueError, match=rf"labels \[{bad}\] are not classes "
                       rf"of this model: use 0..{C - 1} .*or {C} \(the null"):
      far_sample.sample(model, params, jnp.array([0, bad]), jax.random.key(0))
  with pytest.raises(ValueError, match="num_codebooks"):
    model.apply({"params": params}, jnp.zeros((1, 3, N), jnp.int32),
                jnp.zeros((1,), jnp.int32))


def test_shapes_against_the_config_raise_config_error(tiny):
  """A code map that disagrees with config.model is a ConfigError naming the
  key and the value that fits; another layout stays a plain ValueError; a
  head dimension 2D RoPE cannot split fails when the model is built."""
  _, model, params = tiny
  labels = jnp.zeros((1,), jnp.int32)
  fwd = lambda codes: model.apply({"params": params}, codes, labels)
  with pytest.raises(ConfigError, match=r"config.model.num_codebooks=2: set "
                     r"config.model.num_codebooks=3"):
    fwd(jnp.zeros((1, 3, N), jnp.int32))
  with pytest.raises(ConfigError, match=rf"config.model.grid={G} gives "
                     rf"grid\*\*2={N}: set config.model.grid=5"):
    fwd(jnp.zeros((1, 2, 25), jnp.int32))
  with pytest.raises(ValueError, match=r"reshape \(B, k\*N\)") as e:
    fwd(jnp.zeros((1, 2 * N), jnp.int32))
  assert not isinstance(e.value, ConfigError)
  with pytest.raises(ConfigError, match=r"divisible by 4; config.model.dim / "
                     r"config.model.n_head is 36 / 2 = 18"):
    models.build(tiny_config(dim=36).model)


def test_rope_tables_2d_are_llamagen_rows():
  cos, sin = attn_lib.rope_tables_2d(G, D // H)
  rows = _rope_rows(1 + N)
  assert cos.shape == sin.shape == (1 + N, D // H // 2)
  assert cos.dtype == sin.dtype == jnp.float32
  np.testing.assert_allclose(cos, rows[..., 0], rtol=0, atol=1e-7)
  np.testing.assert_allclose(sin, rows[..., 1], rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match="divisible by 4"):
    attn_lib.rope_tables_2d(G, 18)


def test_class_dropout(tiny):
  _, model, params = tiny
  labels = jnp.full((20000,), 3)
  class_labels = jax.jit(lambda p, labels, train: model.apply(
      {"params": p}, labels, train, method="class_labels",
      rngs={"dropout": jax.random.key(0)}), static_argnums=2)
  drop = lambda train: class_labels(params, labels, train)
  dropped = np.asarray(drop(True))
  assert set(np.unique(dropped)) == {3, C}
  assert abs(np.mean(dropped == C) - 0.1) < 0.01
  np.testing.assert_array_equal(drop(False), labels)
  # In the forward: class_dropout = 1 (other dropouts off) == the null class.
  all_drop = models.build(tiny_config(class_dropout=1.0, dropout=0.0,
                                      token_dropout=0.0).model)
  codes = jnp.zeros((2, 2, N), jnp.int32)
  forward = jax.jit(lambda p, labels, train: all_drop.apply(
      {"params": p}, codes, labels, train=train,
      rngs={"dropout": jax.random.key(1)}), static_argnums=2)
  out = forward(params, jnp.array([1, 2]), True)
  null = forward(params, jnp.full((2,), C), False)
  np.testing.assert_allclose(out, null, atol=1e-5)


def test_training_refuses_what_its_grids_could_not_draw(tmp_path):
  """The sample grids decode what the generator draws, so training refuses
  what ``mode=sample`` refuses: more codes than the tokenizer has, and a
  guidance scale FAR would draw as 1.0. With the task, before the data, the
  tokenizer (its checkpoint does not exist) or the workdir; only with the
  grids on."""
  from configs import far_b
  from genvis_jax.models import inference
  from genvis_jax.train import trainer
  c = far_b.get_config("dual,runlocal")
  c.tokenizer.checkpoint, c.train.image_every = "/nowhere/tok", 5
  c.model.codebook_size = c.tokenizer.model.num_codes + 1
  with pytest.raises(inference.CodebookSizeError,
                     match=r"config.model.codebook_size=257 is larger than "
                     r"the tokenizer's config.tokenizer.model.num_codes=256"):
    trainer.train_loop(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  c.model.codebook_size = c.tokenizer.model.num_codes
  c.sample.guidance_scale = 0.5
  with pytest.raises(ConfigError, match=r"guidance_scale=0.5 .*at least 1.0"):
    get_task(c)
  c.sample.guidance_scale = 1.0
  get_task(c)
  c.model.codebook_size, c.sample.guidance_scale = 257, 0.5
  c.train.image_every = 0   # no grids: nothing is drawn, nothing refused
  get_task(c)


def test_task_loss_decreases():
  cfg = tiny_config()
  cfg.optimizer.lr = 3e-3
  task = get_task(cfg)
  params = jax.jit(lambda k: nn.unbox(task.init_params(k)))(jax.random.key(0))
  tx = task.optimizers()["model"]
  opt_state = jax.jit(tx.init)(params["model"])
  codes = jax.random.randint(jax.random.key(1), (4, 2, N), 0, V)
  batch = {"tokens": codes.reshape(4, 2 * N), "label": jnp.array([0, 1, 2, 3])}

  @jax.jit
  def step(params, opt_state, i):
    g, m = task.grads(params, {}, batch, jax.random.fold_in(jax.random.key(2), i), i)
    upd, opt_state = tx.update(g["model"], opt_state, params["model"])
    return {"model": optax.apply_updates(params["model"], upd)}, opt_state, m

  losses = []
  for i in range(10):  # 8 left only ~0.3 margin for some random inits
    params, opt_state, m = step(params, opt_state, i)
    losses.append(float(m["loss"]))
  assert set(m) == {"loss", "accuracy", "ce_vis", "ce_sem", "accuracy_vis",
                    "accuracy_sem"}
  assert losses[0] == pytest.approx(np.log(V), rel=1e-3)  # zero-init heads
  assert float(m["loss"]) == pytest.approx((m["ce_vis"] + m["ce_sem"]) / 2)
  assert losses[-1] < losses[0] - 0.3, losses


def test_far_loss_and_token_layout():
  logits = jnp.zeros((2, 2, 3, 5)).at[:, 0, :, 1].set(10.0)
  codes = jnp.ones((2, 2, 3), jnp.int32)
  loss, ce, acc = far_task.far_loss(logits, codes)
  assert ce[0] < 1e-3 and ce[1] == pytest.approx(np.log(5))
  np.testing.assert_allclose(acc, [1.0, 0.0])
  assert loss == pytest.approx((ce[0] + ce[1]) / 2)
  flat = jnp.arange(12).reshape(2, 6)
  np.testing.assert_array_equal(far_task.as_codes(flat, 2, 3)[1, 1], [9, 10, 11])
  with pytest.raises(ValueError, match="num_codebooks"):
    far_task.as_codes(flat, 3, 3)


def test_weight_decay_groups(tiny):
  cfg, _, params = tiny
  mask = decay_mask(params, cfg.optimizer.no_decay)
  flat = {param_path(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  # LlamaGen: every >= 2-D tensor decays (embeddings too), 1-D ones do not.
  leaves = {param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert all(flat[k] == (leaves[k].ndim >= 2) for k in flat)
  assert flat["tok_embeddings_1/embedding"] and not flat["aggregation_layer/bias"]


@pytest.mark.parametrize("size,variant,millions", [
    ("b", "dual", 417.1), ("b", "triple", 451.7),
    ("l", "dual", 901.2), ("l", "triple", 944.8)])
def test_paper_param_counts(size, variant, millions):
  cfg = importlib.import_module(f"configs.far_{size}").get_config(variant)
  shapes = jax.eval_shape(lambda: models.init_params(cfg.model, jax.random.key(0)))
  assert abs(models.count_params(shapes) / 1e6 - millions) <= 0.05
  assert cfg.model.num_codebooks == (2 if variant == "dual" else 3)
  assert cfg.task == "far" and cfg.data.source == "tokens"


def test_configs():
  assert ffn_hidden_dim(1024) == 2816 and ffn_hidden_dim(1280) == 3584
  assert far_common.get_config("b", None).model.num_codebooks == 2  # default dual
  assert far_common.get_config("l", "triple").sample.guidance_scale == 1.75
  with pytest.raises(ValueError, match="dual"):
    far_common.get_config("b", "quad")
  demo = far_demo.far_demo_config()
  shapes = jax.eval_shape(lambda: models.init_params(demo.model, jax.random.key(0)))
  assert shapes["tok_embeddings_2"]["embedding"].shape == (64, 64)
  assert demo.model.grid == 8 and demo.data.source == "tokens"


def test_each_sub_token_draws_with_its_own_key():
  """Sub-token i of position t draws with ``fold_in(fold_in(rng, t), i)``:
  one key per position made the factorized sub-tokens share their draw."""
  key, flat = jax.random.key(0), jnp.zeros((4, 32))
  pairs = []
  for t in range(8):
    for i in range(2):
      got = far_sample.pick(flat, key, t, i, 1.0, 1.0, False, 0, 1.0)
      want = ar.draw(flat, jax.random.fold_in(jax.random.fold_in(key, t), i),
                     1.0, 1.0, False, 0, 1.0)
      np.testing.assert_array_equal(got, want)
    pairs.append((np.asarray(far_sample.pick(flat, key, t, 0, 1.0, 1.0, False,
                                             0, 1.0)),
                  np.asarray(far_sample.pick(flat, key, t, 1, 1.0, 1.0, False,
                                             0, 1.0))))
  assert any((a != b).any() for a, b in pairs)
